//! Packing quality of the planner's bin packing (first-fit decreasing over pod classes), against
//! the lower bound ceil(total requests / node capacity) and, in the same run, plain first-fit
//! in arrival order (the baseline). Counts nodes, not time.
//!
//! - **Random mixes** (target: within 5 % of the lower bound): 100 seeded mixes of 20–80
//!   deployments with 1–200 replicas each, requests 100 m–8 CPU and 128 MiB–32 GiB, onto
//!   16 CPU / 64 GiB / 110-pod nodes.
//! - **Alibaba trace**: the CPU-only pods of `openb_pod_list_cpu300.csv` onto 32 CPU / 256 GiB
//!   nodes (the trace's common node), all at once.
//! - **Falkenauer** (OR-Library binpack1–8 with BPPLIB's proven optima, `../shared/data`): one
//!   pod per item, CPU = item size, against the optimum rather than the lower bound.
//!
//! `cargo bench -p shoal-decider --bench packing`

use std::{collections::BTreeMap, path::PathBuf};

use rand::{Rng, SeedableRng, rngs::StdRng};
use shoal_core::Resources;
use shoal_decider::planner::packing::{Item, first_fit, first_fit_decreasing, lower_bound};

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

/// Nodes used by FFD, by first-fit and the lower bound for one mix of (request, count).
fn pack(mix: &[(Resources, i64)], capacity: &Resources) -> (i64, i64, i64) {
    let items: Vec<Item<'_>> = mix
        .iter()
        .enumerate()
        .map(|(class, (request, count))| Item {
            class,
            request,
            count: *count,
        })
        .collect();
    let ffd = first_fit_decreasing(&items, capacity, usize::MAX);
    let ff = first_fit(&items, capacity, usize::MAX);
    let total: i64 = mix.iter().map(|(_, c)| c).sum();
    assert_eq!(ffd.pods(), total, "FFD left pods unplaced");
    assert_eq!(ff.pods(), total, "first-fit left pods unplaced");
    (
        ffd.nodes.len() as i64,
        ff.nodes.len() as i64,
        lower_bound(&items, capacity),
    )
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
    let (mut ffd_over, mut ff_over) = (Vec::new(), Vec::new());
    let (mut ffd_total, mut ff_total, mut lb_total) = (0, 0, 0);
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
        let (ffd, ff, lb) = pack(&mix, &capacity);
        ffd_over.push(pct(ffd, lb));
        ff_over.push(pct(ff, lb));
        ffd_total += ffd;
        ff_total += ff;
        lb_total += lb;
    }
    let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!("random mixes (100 seeds, 16 CPU / 64 GiB / 110 pods):");
    println!(
        "  lower bound {lb_total} nodes | FFD (planner) {ffd_total} (+{:.2} %, median +{:.2} %, worst +{:.2} %) | first-fit {ff_total} (+{:.2} %, median +{:.2} %, worst +{:.2} %) | FFD/first-fit {:.3}",
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
    let (ffd, ff, lb) = pack(&mix, &node(32_000, 256 * 1024 * MI, 110));
    println!(
        "alibaba cpu300 trace ({pods} CPU-only pods in {} classes, 32 CPU / 256 GiB nodes):",
        mix.len()
    );
    println!(
        "  lower bound {lb} | FFD (planner) {ffd} (+{:.2} %) | first-fit {ff} (+{:.2} %) | FFD/first-fit {:.3}",
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
    for file in 1..=8 {
        let text =
            std::fs::read_to_string(dir.join(format!("binpack{file}.txt"))).expect("binpack file");
        let mut words = text.split_whitespace();
        let instances: usize = words.next().and_then(|w| w.parse().ok()).expect("count");
        let (mut ffd_sum, mut ff_sum, mut opt_sum, mut name0) = (0, 0, 0, String::new());
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
            let mix = sizes.mix();
            let cap = node((capacity * 10.0).round() as i64, 0, i64::MAX / 4);
            let (ffd, ff, _) = pack(&mix, &cap);
            ffd_sum += ffd;
            ff_sum += ff;
            opt_sum += optimum.get(&name).copied().expect("instance in optima.csv");
            if name0.is_empty() {
                name0 = name;
            }
        }
        let class = name0.split('_').next().unwrap_or("?").to_string();
        println!(
            "  {class:>6}: optimum {opt_sum} | FFD (planner) {ffd_sum} (+{:.2} %) | first-fit {ff_sum} (+{:.2} %)",
            pct(ffd_sum, opt_sum),
            pct(ff_sum, opt_sum)
        );
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing here is timed.
    random_mixes();
    alibaba();
    falkenauer();
}
