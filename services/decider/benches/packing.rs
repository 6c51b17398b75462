//! Packing quality of the planner's packer ([`pack`]: FFD improved within the default 20 ms
//! budget) against the lower bound ceil(total requests / node capacity) or the proven optimum
//! and, in the same run, first-fit decreasing (what Cluster Autoscaler and Karpenter use) and
//! plain first-fit in arrival order. Counts nodes, and the time each packing took.
//!
//! - **Random mixes** (target: within 5 % of the lower bound): 100 seeded mixes of 20–80
//!   deployments with 1–200 replicas each, requests 100 m–8 CPU and 128 MiB–32 GiB, onto
//!   16 CPU / 64 GiB / 110-pod nodes.
//! - **Alibaba trace**: the CPU-only pods of `openb_pod_list_cpu300.csv` onto 32 CPU / 256 GiB
//!   nodes (the trace's common node), all at once.
//! - **Falkenauer** (OR-Library binpack1–8 with BPPLIB's proven optima, `../shared/data`): one
//!   pod per item, CPU = item size, against the optimum rather than the lower bound.
//! - **Fresh instances** of the same constructions (seeded, not in any file), because the packer
//!   must generalise: Falkenauer triplets (optimum n/3 by construction) and uniform items, in
//!   one dimension and in two (CPU and memory each drawn by the construction, so a 2-D triplet
//!   still fills its node exactly in both).
//!
//! `cargo bench -p shoal-decider --bench packing`

use std::{collections::BTreeMap, path::PathBuf};

use rand::{Rng, SeedableRng, rngs::StdRng};
use shoal_core::Resources;
use std::time::{Duration, Instant};

use shoal_decider::planner::packing::{
    DEFAULT_BUDGET, Item, first_fit, first_fit_decreasing, lower_bound, pack as plan_pack,
};

const MI: i64 = 1 << 20;
const GI: i64 = 1 << 30;

fn request(cpu: i64, memory: i64) -> Resources {
    Resources {
        cpu_millis: cpu,
        memory_bytes: memory,
        pods: 1,
        ..Default::default()
    }
}

fn node(cpu: i64, memory: i64, pods: i64) -> Resources {
    Resources {
        cpu_millis: cpu,
        memory_bytes: memory,
        pods,
        ..Default::default()
    }
}

/// Nodes one mix needs: by the planner's packer, by FFD, by first-fit; the lower bound; and the
/// packer's time.
struct Counts {
    packer: i64,
    ffd: i64,
    ff: i64,
    lb: i64,
    time: Duration,
}

fn pack(mix: &[(Resources, i64)], capacity: &Resources) -> Counts {
    let items: Vec<Item<'_>> = mix
        .iter()
        .enumerate()
        .map(|(class, (request, count))| Item {
            class,
            request,
            count: *count,
        })
        .collect();
    let started = Instant::now();
    let packed = plan_pack(&items, capacity, usize::MAX, budget(), 7);
    let time = started.elapsed();
    let ffd = first_fit_decreasing(&items, capacity, usize::MAX);
    let ff = first_fit(&items, capacity, usize::MAX);
    let total: i64 = mix.iter().map(|(_, c)| c).sum();
    assert_eq!(
        packed.packing.pods(),
        total,
        "the packer left pods unplaced"
    );
    assert_eq!(ffd.pods(), total, "FFD left pods unplaced");
    assert_eq!(ff.pods(), total, "first-fit left pods unplaced");
    check(&items, capacity, &packed);
    assert_eq!(packed.first_fit_decreasing, ffd.nodes.len());
    Counts {
        packer: packed.packing.nodes.len() as i64,
        ffd: ffd.nodes.len() as i64,
        ff: ff.nodes.len() as i64,
        lb: lower_bound(&items, capacity),
        time,
    }
}

/// The packer's budget: the planner's default, or `PACKING_BENCH_BUDGET_MS`.
fn budget() -> Duration {
    std::env::var("PACKING_BENCH_BUDGET_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(DEFAULT_BUDGET, Duration::from_millis)
}

/// The packing is real: every node's contents fit its capacity in every dimension.
fn check(
    items: &[Item<'_>],
    capacity: &Resources,
    packed: &shoal_decider::planner::packing::Packed,
) {
    for node in &packed.contents {
        let used = node.iter().fold(Resources::default(), |acc, (i, n)| {
            acc.saturating_add(&items[*i].request.times(*n))
        });
        assert!(
            used.cpu_millis <= capacity.cpu_millis
                && used.memory_bytes <= capacity.memory_bytes
                && used.pods <= capacity.pods,
            "a node is over capacity: {used:?}"
        );
    }
}

/// Identical requests grouped into classes (as the metrics service groups pods), in order of
/// first appearance, which is the order first-fit takes them in.
#[derive(Default)]
struct Classes {
    index: BTreeMap<(i64, i64), usize>,
    mix: Vec<(Resources, i64)>,
}

impl Classes {
    fn add(&mut self, cpu: i64, memory: i64) {
        let next = self.mix.len();
        let i = *self.index.entry((cpu, memory)).or_insert(next);
        if i == next {
            self.mix.push((request(cpu, memory), 0));
        }
        self.mix[i].1 += 1;
    }

    fn mix(self) -> Vec<(Resources, i64)> {
        self.mix
    }
}

fn pct(used: i64, bound: i64) -> f64 {
    100.0 * (used - bound) as f64 / bound as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn random_mixes() {
    let capacity = node(16_000, 64 * GI, 110);
    let (mut ffd_over, mut ff_over, mut packer_over) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ffd_total, mut ff_total, mut lb_total, mut packer_total) = (0, 0, 0, 0);
    let mut times = Vec::new();
    for seed in 0..100u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let deployments = rng.random_range(20..=80);
        let mix: Vec<(Resources, i64)> = (0..deployments)
            .map(|_| {
                // Requests skewed small, as real ones are: most pods well under a core.
                let cpu = (100.0 * 80f64.powf(rng.random::<f64>().powi(2))) as i64;
                let memory = (128.0 * 256f64.powf(rng.random::<f64>().powi(2))) as i64 * MI;
                (request(cpu, memory), rng.random_range(1..=200))
            })
            .collect();
        let Counts {
            packer,
            ffd,
            ff,
            lb,
            time,
        } = pack(&mix, &capacity);
        packer_over.push(pct(packer, lb));
        packer_total += packer;
        times.push(time.as_secs_f64() * 1000.0);
        ffd_over.push(pct(ffd, lb));
        ff_over.push(pct(ff, lb));
        ffd_total += ffd;
        ff_total += ff;
        lb_total += lb;
    }
    let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!("random mixes (100 seeds, 16 CPU / 64 GiB / 110 pods):");
    println!(
        "  packer {packer_total} (+{:.2} %, median +{:.2} %, worst +{:.2} %; median {:.1} ms, max {:.1} ms)",
        pct(packer_total, lb_total),
        median(packer_over.clone()),
        worst(&packer_over),
        median(times.clone()),
        times.iter().copied().fold(0.0, f64::max),
    );
    println!(
        "  lower bound {lb_total} nodes | FFD {ffd_total} (+{:.2} %, median +{:.2} %, worst +{:.2} %) | first-fit {ff_total} (+{:.2} %, median +{:.2} %, worst +{:.2} %) | FFD/first-fit {:.3}",
        pct(ffd_total, lb_total),
        median(ffd_over.clone()),
        worst(&ffd_over),
        pct(ff_total, lb_total),
        median(ff_over.clone()),
        worst(&ff_over),
        ffd_total as f64 / ff_total as f64,
    );
}

fn data_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    assert!(
        dir.is_dir(),
        "benchmark data not found at {} (the shared data folder beside the checkout)",
        dir.display()
    );
    dir
}

fn alibaba() {
    let path = data_dir().join("traces/alibaba-gpu-v2023/openb_pod_list_cpu300.csv");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut classes = Classes::default();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (cpu, memory, gpus) = (f[1], f[2], f[3]);
        if gpus != "0" {
            continue;
        }
        let cpu: i64 = cpu.parse().expect("cpu_milli");
        let memory: i64 = memory.parse().expect("memory_mib");
        classes.add(cpu, memory * MI);
    }
    let mix = classes.mix();
    let pods: i64 = mix.iter().map(|(_, c)| c).sum();
    let Counts {
        packer,
        ffd,
        ff,
        lb,
        time,
    } = pack(&mix, &node(32_000, 256 * 1024 * MI, 110));
    println!(
        "alibaba cpu300 trace ({pods} CPU-only pods in {} classes, 32 CPU / 256 GiB nodes):",
        mix.len()
    );
    println!(
        "  lower bound {lb} | packer {packer} (+{:.2} %, {:.1} ms) | FFD {ffd} (+{:.2} %) | first-fit {ff} (+{:.2} %) | FFD/first-fit {:.3}",
        pct(packer, lb),
        time.as_secs_f64() * 1000.0,
        pct(ffd, lb),
        pct(ff, lb),
        ffd as f64 / ff as f64
    );
}

fn falkenauer() {
    let dir = data_dir().join("falkenauer");
    let optima = std::fs::read_to_string(dir.join("optima.csv")).expect("optima.csv");
    let mut optimum: BTreeMap<String, i64> = BTreeMap::new();
    for line in optima.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        optimum.insert(f[1].to_string(), f[5].parse().expect("optimum_bpplib"));
    }
    println!("falkenauer (one pod per item, CPU = size; vs proven optimum):");
    println!(
        "  | class | optimum | packer | FFD | first-fit | packer over optimum | worst instance | packer time p50 / max |"
    );
    let (mut all_opt, mut all_packer, mut all_ffd, mut worst_all) = (0, 0, 0, 0);
    for file in 1..=8 {
        let text =
            std::fs::read_to_string(dir.join(format!("binpack{file}.txt"))).expect("binpack file");
        let mut words = text.split_whitespace();
        let instances: usize = words.next().and_then(|w| w.parse().ok()).expect("count");
        let mut sum = Sums::default();
        for _ in 0..instances {
            let name = words.next().expect("name").to_string();
            // Sizes with one decimal (triplets) are scaled by 10 to stay integral.
            let capacity: f64 = words.next().and_then(|w| w.parse().ok()).expect("cap");
            let n: usize = words.next().and_then(|w| w.parse().ok()).expect("n");
            let _best_known = words.next();
            let mut sizes = Classes::default();
            for _ in 0..n {
                let s: f64 = words.next().and_then(|w| w.parse().ok()).expect("size");
                sizes.add((s * 10.0).round() as i64, 0);
            }
            let cap = node((capacity * 10.0).round() as i64, 0, i64::MAX / 4);
            let best = optimum.get(&name).copied().expect("instance in optima.csv");
            sum.add(&name, pack(&sizes.mix(), &cap), best);
        }
        sum.print();
        all_opt += sum.reference;
        all_packer += sum.packer;
        all_ffd += sum.ffd;
        worst_all = worst_all.max(sum.worst.0);
    }
    println!(
        "  all 160: optimum {all_opt} | packer {all_packer} (+{:.2} %) | FFD {all_ffd} (+{:.2} %) | worst instance +{worst_all}",
        pct(all_packer, all_opt),
        pct(all_ffd, all_opt)
    );
}

/// Totals over the instances of one class.
#[derive(Default)]
struct Sums {
    class: String,
    reference: i64,
    packer: i64,
    ffd: i64,
    ff: i64,
    /// (nodes over the reference, instance).
    worst: (i64, String),
    times: Vec<f64>,
}

impl Sums {
    fn add(&mut self, name: &str, counts: Counts, reference: i64) {
        if self.class.is_empty() {
            self.class = name.split('_').next().unwrap_or("?").to_string();
        }
        self.reference += reference;
        self.packer += counts.packer;
        self.ffd += counts.ffd;
        self.ff += counts.ff;
        let over = counts.packer - reference;
        if over > self.worst.0 || self.worst.1.is_empty() {
            self.worst = (over, name.to_string());
        }
        self.times.push(counts.time.as_secs_f64() * 1000.0);
    }

    fn print(&self) {
        println!(
            "  | {} | {} | {} | {} | {} | +{:.2} % | +{} ({}) | {:.1} / {:.1} ms |",
            self.class,
            self.reference,
            self.packer,
            self.ffd,
            self.ff,
            pct(self.packer, self.reference),
            self.worst.0,
            self.worst.1,
            median(self.times.clone()),
            self.times.iter().copied().fold(0.0, f64::max),
        );
    }
}

/// Falkenauer's triplet construction (capacity 1000): a first item in [380, 490], a second in
/// [250, (1000 - first) / 2], the third the rest, so every triplet fills a node exactly; in two
/// dimensions each dimension is drawn the same way for the same triplet. Shuffled.
fn triplets(rng: &mut StdRng, n: usize, two_d: bool) -> Vec<(i64, i64)> {
    let draw = |rng: &mut StdRng| {
        let a = rng.random_range(380..=490);
        let b = rng.random_range(250..=(1000 - a) / 2);
        [a, b, 1000 - a - b]
    };
    let mut items = Vec::with_capacity(n);
    for _ in 0..n / 3 {
        let cpu = draw(rng);
        let memory = if two_d { draw(rng) } else { [0; 3] };
        for k in 0..3 {
            items.push((cpu[k], memory[k]));
        }
    }
    for i in (1..items.len()).rev() {
        items.swap(i, rng.random_range(0..=i));
    }
    items
}

/// Falkenauer's uniform construction: sizes in [20, 100] onto capacity 150, per dimension.
fn uniform(rng: &mut StdRng, n: usize, two_d: bool) -> Vec<(i64, i64)> {
    (0..n)
        .map(|_| {
            let memory = if two_d { rng.random_range(20..=100) } else { 0 };
            (rng.random_range(20..=100), memory)
        })
        .collect()
}

fn fresh() {
    println!(
        "fresh instances (seeds 1000-1009 per row; triplets vs the optimum n/3, uniform vs the lower bound):"
    );
    println!(
        "  | construction | reference | packer | FFD | first-fit | packer over reference | worst instance | packer time p50 / max |"
    );
    for (kind, n, two_d) in [
        ("t", 60, false),
        ("t", 120, false),
        ("t", 249, false),
        ("t", 501, false),
        ("t", 120, true),
        ("t", 501, true),
        ("u", 120, false),
        ("u", 1000, false),
        ("u", 250, true),
        ("u", 1000, true),
    ] {
        let mut sum = Sums::default();
        for seed in 1000..1010u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let (items, cap) = if kind == "t" {
                (triplets(&mut rng, n, two_d), 1000)
            } else {
                (uniform(&mut rng, n, two_d), 150)
            };
            let mut classes = Classes::default();
            for (cpu, memory) in items {
                classes.add(cpu, memory);
            }
            let capacity = node(cap, if two_d { cap } else { 0 }, i64::MAX / 4);
            let mix = classes.mix();
            let counts = pack(&mix, &capacity);
            let reference = if kind == "t" {
                (n / 3) as i64
            } else {
                counts.lb
            };
            let dims = if two_d { "2-D" } else { "1-D" };
            sum.add(&format!("{kind}{n}-{dims}_{seed}"), counts, reference);
        }
        sum.print();
    }
}

fn main() {
    // `cargo bench` passes --bench. PACKING_BENCH_ONLY=falkenauer|fresh|random|alibaba picks one.
    let only = std::env::var("PACKING_BENCH_ONLY").unwrap_or_default();
    if !only.is_empty() {
        match only.as_str() {
            "falkenauer" => falkenauer(),
            "fresh" => fresh(),
            "random" => random_mixes(),
            _ => alibaba(),
        }
        return;
    }
    random_mixes();
    alibaba();
    falkenauer();
    fresh();
}
