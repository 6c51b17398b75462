//! Packing near the optimum within a time budget. Three steps, each keeping the best packing so
//! far (anytime):
//!
//! 1. **First-fit decreasing**, the packing Cluster Autoscaler and Karpenter use (the baseline a
//!    decision reports).
//! 2. **Minimum bin slack** (Gupta & Ho): node by node, the largest pod left plus the set of
//!    other pods that leaves the least room unused, found by a bounded depth-first search (which
//!    jumps past pods heavier than the room left, takes the heaviest that fits when only one more
//!    can, and gives up a branch when all pods after it could not fill the node better). Paced:
//!    each node gets the search steps its share of the time left allows; when the share of the
//!    budget ends, the pods left go first-fit decreasing.
//! 3. **Emptying a node** (after the consistent-neighbourhood search of Buljubašić & Vasquez):
//!    the pods of the three least-filled nodes go to a pool; pods move between nodes and the pool
//!    — swaps of up to two each way, refilling a node from its pods and the pool's, repacking two
//!    nodes at random (kept when the pool gets no heavier, to cross plateaus), tabu ejections —
//!    so that the nodes fill up and the pool shrinks, until the pool fits on two nodes: one node
//!    fewer. Then again, down to the lower bound or until the budget ends. Each step looks at a
//!    dozen nodes from a random start, and weighs a move before checking that it fits.
//!
//! Every dimension a pod requests counts (CPU, memory, ephemeral storage, pod slots, extended
//! resources); sizes are weighed by their share of a node in the dimensions that bind.

use std::time::Instant;

use rand::{Rng, SeedableRng, rngs::StdRng};
use shoal_core::Resources;

use super::{Item, size_key};

const EPS: f64 = 1e-9;

/// The packing problem in vectors: one row per item (pod class).
pub(super) struct Problem {
    /// Extended resource names, in dimension order after the four built-in ones.
    extended: Vec<String>,
    cap: Vec<i64>,
    size: Vec<Vec<i64>>,
    weight: Vec<f64>,
    /// Dimensions that weights (and slack) count, with 1 / capacity.
    binds: Vec<(usize, f64)>,
    count: Vec<i64>,
    /// Item order for first-fit decreasing (the planner's baseline order).
    ffd_order: Vec<usize>,
    /// Item order by weight, heaviest first.
    heavy_first: Vec<usize>,
}

/// A node of a packing: its load and the pods on it as (item, count).
#[derive(Debug, Clone)]
pub(super) struct Bin {
    load: Vec<i64>,
    items: Vec<(usize, i64)>,
}

impl Problem {
    pub(super) fn new(items: &[Item<'_>], capacity: &Resources) -> Problem {
        let mut extended: Vec<String> = items
            .iter()
            .flat_map(|i| i.request.extended.keys().cloned())
            .collect();
        extended.sort();
        extended.dedup();
        let vector = |r: &Resources, pods: i64| -> Vec<i64> {
            let mut v = vec![
                r.cpu_millis,
                r.memory_bytes,
                r.ephemeral_storage_bytes,
                pods,
            ];
            v.extend(
                extended
                    .iter()
                    .map(|n| r.extended.get(n).copied().unwrap_or(0)),
            );
            v
        };
        let cap = vector(capacity, capacity.pods);
        let size: Vec<Vec<i64>> = items
            .iter()
            .map(|i| vector(i.request, i.request.pods.max(1)))
            .collect();
        let count: Vec<i64> = items.iter().map(|i| i.count.max(0)).collect();
        // A dimension binds when the total demand in it is near the largest relative demand.
        let demand: Vec<f64> = (0..cap.len())
            .map(|d| {
                if cap[d] <= 0 {
                    return 0.0;
                }
                size.iter()
                    .zip(&count)
                    .map(|(s, c)| s[d] as f64 * *c as f64)
                    .sum::<f64>()
                    / cap[d] as f64
            })
            .collect();
        let top = demand.iter().copied().fold(0.0, f64::max);
        let binds: Vec<bool> = demand
            .iter()
            .enumerate()
            .map(|(d, v)| *v > 0.0 && (d < 2 || *v >= 0.5 * top))
            .collect();
        let binds: Vec<(usize, f64)> = (0..cap.len())
            .filter(|d| binds[*d])
            .map(|d| (d, 1.0 / cap[d] as f64))
            .collect();
        let weight: Vec<f64> = size
            .iter()
            .map(|s| binds.iter().map(|(d, inv)| s[*d] as f64 * inv).sum())
            .collect();
        let mut ffd_order: Vec<usize> = (0..items.len()).collect();
        ffd_order.sort_by(|a, b| {
            size_key(items[*b].request, capacity).total_cmp(&size_key(items[*a].request, capacity))
        });
        let mut heavy_first: Vec<usize> = (0..items.len()).collect();
        heavy_first.sort_by(|a, b| weight[*b].total_cmp(&weight[*a]).then(a.cmp(b)));
        Problem {
            extended,
            cap,
            size,
            weight,
            binds,
            count,
            ffd_order,
            heavy_first,
        }
    }

    fn dims(&self) -> usize {
        self.cap.len()
    }

    /// A node with nothing on it.
    fn empty_bin(&self) -> Bin {
        Bin {
            load: vec![0; self.dims()],
            items: Vec::new(),
        }
    }

    /// Sorts (item, count) heaviest first, by item on ties.
    fn heaviest_first(&self, items: &mut [(usize, i64)]) {
        items.sort_by(|x, y| {
            self.weight[y.0]
                .total_cmp(&self.weight[x.0])
                .then(x.0.cmp(&y.0))
        });
    }

    /// How many of item `i` fit on top of `load`.
    fn fit(&self, load: &[i64], i: usize) -> i64 {
        let mut n = i64::MAX;
        for (d, want) in self.size[i].iter().enumerate() {
            let room = self.cap[d] - load[d];
            if *want > 0 {
                n = n.min(room.max(0) / want);
            } else if room < 0 {
                return 0;
            }
        }
        n
    }

    fn add(&self, load: &mut [i64], i: usize, n: i64) {
        for (l, s) in load.iter_mut().zip(&self.size[i]) {
            *l += s * n;
        }
    }

    pub(super) fn bin_weight(&self, bin: &Bin) -> f64 {
        bin.items
            .iter()
            .map(|(i, n)| self.weight[*i] * *n as f64)
            .sum()
    }

    fn fits(&self, load: &[i64]) -> bool {
        load.iter().zip(&self.cap).all(|(l, c)| l <= c)
    }

    /// Free resources of a node with this load.
    pub(super) fn free(&self, load: &[i64]) -> Resources {
        let f = |d: usize| self.cap[d] - load[d];
        Resources {
            cpu_millis: f(0),
            memory_bytes: f(1),
            ephemeral_storage_bytes: f(2),
            pods: f(3),
            extended: self
                .extended
                .iter()
                .enumerate()
                .map(|(k, n)| (n.clone(), f(4 + k)))
                .collect(),
        }
    }

    /// First-fit decreasing, as [`super::first_fit_decreasing`] without a node cap, keeping
    /// which pods went where.
    pub(super) fn first_fit_decreasing(&self) -> Vec<Bin> {
        self.first_fit_decreasing_of(&self.count)
    }

    /// First-fit decreasing of `count` pods of each item onto new nodes.
    fn first_fit_decreasing_of(&self, count: &[i64]) -> Vec<Bin> {
        let mut bins: Vec<Bin> = Vec::new();
        for &i in &self.ffd_order {
            let mut left = count[i];
            for bin in bins.iter_mut() {
                if left == 0 {
                    break;
                }
                let n = self.fit(&bin.load, i).min(left);
                if n > 0 {
                    self.add(&mut bin.load, i, n);
                    push(&mut bin.items, i, n);
                    left -= n;
                }
            }
            let per_node = self.fit(&vec![0; self.dims()], i);
            while left > 0 && per_node > 0 {
                let n = per_node.min(left);
                let mut bin = self.empty_bin();
                self.add(&mut bin.load, i, n);
                push(&mut bin.items, i, n);
                left -= n;
                bins.push(bin);
            }
        }
        bins
    }

    /// Minimum bin slack: each node gets the heaviest pod left and the pods that fill it best.
    /// Anytime: at the deadline, the pods left go first-fit decreasing onto further nodes.
    pub(super) fn minimum_bin_slack(&self, deadline: Instant) -> Vec<Bin> {
        let started = Instant::now();
        let mut left = self.count.clone();
        let mut left_weight: f64 = (0..left.len())
            .map(|i| self.weight[i] * left[i] as f64)
            .sum();
        // A full node weighs one per weighed dimension.
        let full = self.binds.len().max(1) as f64;
        let mut steps_done = 0usize;
        let mut bins = Vec::new();
        let mut cursor = 0;
        loop {
            while cursor < self.heavy_first.len() && left[self.heavy_first[cursor]] == 0 {
                cursor += 1;
            }
            let Some(&first) = self.heavy_first.get(cursor) else {
                break;
            };
            let now = Instant::now();
            if now > deadline {
                bins.extend(self.first_fit_decreasing_of(&left));
                break;
            }
            // Paced: the steps each node gets are what the time left allows for the nodes
            // still to fill, at the speed so far, so that every node gets some search.
            let limit = if steps_done == 0 {
                FILL_STEPS
            } else {
                let per_step = (now - started).as_secs_f64() / steps_done as f64;
                let nodes_left = (left_weight / full).ceil().max(1.0);
                let time_left = (deadline - now).as_secs_f64();
                ((time_left / nodes_left / per_step) as usize).clamp(MIN_FILL_STEPS, FILL_STEPS)
            };
            left[first] -= 1;
            let mut start = self.empty_bin();
            self.add(&mut start.load, first, 1);
            push(&mut start.items, first, 1);
            let candidates: Vec<(usize, i64)> = self.heavy_first[cursor..]
                .iter()
                .filter(|i| left[**i] > 0)
                .map(|i| (*i, left[*i]))
                .collect();
            let (bin, steps) = self.best_fill_counted(start, &candidates, limit);
            steps_done += steps.max(1);
            for (i, n) in &bin.items {
                left[*i] -= n;
            }
            left[first] += 1;
            left_weight -= self.bin_weight(&bin);
            bins.push(bin);
        }
        bins
    }

    /// The fullest node reachable from `start` by adding pods of `candidates` ((item, available)
    /// heaviest first), by a depth-first search of at most `steps` steps.
    fn best_fill(&self, start: Bin, candidates: &[(usize, i64)], steps: usize) -> Bin {
        self.best_fill_counted(start, candidates, steps).0
    }

    /// [`Problem::best_fill`], with the steps it took.
    fn best_fill_counted(
        &self,
        start: Bin,
        candidates: &[(usize, i64)],
        steps: usize,
    ) -> (Bin, usize) {
        let weights: Vec<f64> = candidates.iter().map(|c| self.weight[c.0]).collect();
        let sorted = weights.windows(2).all(|w| w[0] >= w[1]);
        // What all candidates from k on weigh together.
        let mut rest = vec![0.0; candidates.len() + 1];
        for k in (0..candidates.len()).rev() {
            rest[k] = rest[k + 1] + weights[k] * candidates[k].1 as f64;
        }
        let mut fill = Fill {
            problem: self,
            candidates,
            weights,
            sorted,
            rest,
            left: candidates.iter().map(|c| c.1).collect(),
            best_slack: self.weight_of_room(&start.load),
            best: start.clone(),
            current: start,
            steps: 0,
            limit: steps,
        };
        fill.search(0);
        (fill.best, fill.steps)
    }
}

/// Fisher–Yates, in place.
fn shuffle<T>(items: &mut [T], rng: &mut StdRng) {
    for k in (1..items.len()).rev() {
        items.swap(k, rng.random_range(0..=k));
    }
}

fn push(items: &mut Vec<(usize, i64)>, i: usize, n: i64) {
    if let Some(e) = items.iter_mut().find(|e| e.0 == i) {
        e.1 += n;
    } else {
        items.push((i, n));
    }
}

fn pull(items: &mut Vec<(usize, i64)>, i: usize, n: i64) {
    if let Some(k) = items.iter().position(|e| e.0 == i) {
        items[k].1 -= n;
        if items[k].1 <= 0 {
            items.swap_remove(k);
        }
    }
}

/// The bounded subset search of minimum bin slack for one node.
struct Fill<'a> {
    problem: &'a Problem,
    candidates: &'a [(usize, i64)],
    /// Weight of one pod of each candidate.
    weights: Vec<f64>,
    /// Candidates come heaviest first: those heavier than the room left are skipped at once.
    sorted: bool,
    /// Weight of all pods of the candidates from k on.
    rest: Vec<f64>,
    /// Pods of each candidate not on the node yet.
    left: Vec<i64>,
    current: Bin,
    best: Bin,
    best_slack: f64,
    steps: usize,
    limit: usize,
}

/// Search steps per node: enough to find exact fills among hundreds of sizes, bounded so that a
/// decision with thousands of nodes stays fast.
const FILL_STEPS: usize = 4_000;

/// Fewest search steps per node in minimum bin slack, however short the time.
const MIN_FILL_STEPS: usize = 100;

/// Search steps per node when refilling a node from the pool during the search.
const REFILL_STEPS: usize = 400;

impl Fill<'_> {
    fn done(&self) -> bool {
        self.steps > self.limit || self.best_slack <= EPS
    }

    fn search(&mut self, from: usize) {
        let room = self.problem.weight_of_room(&self.current.load);
        let from = if self.sorted {
            from + self.weights[from..].partition_point(|w| *w > room + EPS)
        } else {
            from
        };
        // Even every pod left would not fill the node better than the best so far.
        if room - self.rest[from] >= self.best_slack - EPS {
            return;
        }
        // Room for one pod at most: the first that fits (the heaviest) is the best there is.
        let last_pod = self.sorted && self.weights.last().is_some_and(|w| room < 2.0 * w - EPS);
        for k in from..self.candidates.len() {
            self.steps += 1;
            if self.done() {
                return;
            }
            if self.left[k] == 0 {
                continue;
            }
            let i = self.candidates[k].0;
            let most = self.problem.fit(&self.current.load, i).min(self.left[k]);
            if most == 0 {
                continue;
            }
            // All that fit, then one and two fewer: runs of identical pods need not branch on
            // every count.
            for n in (most.saturating_sub(2).max(1)..=most).rev() {
                self.problem.add(&mut self.current.load, i, n);
                push(&mut self.current.items, i, n);
                self.left[k] -= n;
                let slack = self.problem.weight_of_room(&self.current.load);
                if slack < self.best_slack - EPS {
                    self.best_slack = slack;
                    self.best = self.current.clone();
                }
                if !last_pod {
                    self.search(k + 1);
                }
                self.problem.add(&mut self.current.load, i, -n);
                pull(&mut self.current.items, i, n);
                self.left[k] += n;
                if self.done() || last_pod {
                    return;
                }
            }
        }
    }
}

impl Problem {
    /// Share of a node left unused, summed over the binding dimensions (those weights use).
    fn weight_of_room(&self, load: &[i64]) -> f64 {
        self.binds
            .iter()
            .map(|(d, inv)| (self.cap[*d] - load[*d]) as f64 * inv)
            .sum()
    }
}

/// The local search that empties one node at a time.
struct Search<'a> {
    problem: &'a Problem,
    bins: Vec<Bin>,
    pool: Bin,
    /// Per node: (item, first iteration the item may go back into it).
    tabu: Vec<Vec<(usize, u64)>>,
    rng: StdRng,
    iteration: u64,
}

/// Up to two pods of a node or the pool, as (item, count) with at most two entries.
type Pick = [(usize, i64); 2];

/// Pairs are enumerated among all of a node's (or the pool's) pod classes up to this many
/// classes; among [`PAIR_SAMPLE`] of them (shuffled each time) beyond.
const PAIR_CLASSES: usize = 9;
const PAIR_SAMPLE: usize = 5;

/// Nodes one improving step looks at (from a random start) before giving up.
const SCAN_NODES: usize = 12;

/// The picks of up to two pods from `items`: every single pod, and pairs (among the first
/// [`PAIR_SAMPLE`] classes of a long list, which the caller shuffles so that pairs vary).
fn picks(items: &[(usize, i64)], with_empty: bool) -> Vec<Pick> {
    let paired = if items.len() <= PAIR_CLASSES {
        items.len()
    } else {
        PAIR_SAMPLE
    };
    let mut out = Vec::new();
    if with_empty {
        out.push([(0, 0), (0, 0)]);
    }
    for (a, (i, n)) in items.iter().enumerate() {
        out.push([(*i, 1), (0, 0)]);
        if a >= paired {
            continue;
        }
        if *n >= 2 {
            out.push([(*i, 2), (0, 0)]);
        }
        for (j, _) in items[a + 1..].iter().take(paired.saturating_sub(a + 1)) {
            out.push([(*i, 1), (*j, 1)]);
        }
    }
    out
}

/// `items`, shuffled when pairs would not cover them all.
fn sampled(items: &[(usize, i64)], rng: &mut StdRng) -> Vec<(usize, i64)> {
    let mut items = items.to_vec();
    if items.len() > PAIR_CLASSES {
        shuffle(&mut items, rng);
    }
    items
}

impl Search<'_> {
    fn pick_weight(&self, p: &Pick) -> f64 {
        p.iter()
            .map(|(i, n)| self.problem.weight[*i] * *n as f64)
            .sum()
    }

    fn apply(&mut self, b: usize, out: &Pick, into: &Pick) {
        for (i, n) in out.iter().filter(|e| e.1 > 0) {
            self.problem.add(&mut self.bins[b].load, *i, -n);
            pull(&mut self.bins[b].items, *i, *n);
            self.problem.add(&mut self.pool.load, *i, *n);
            push(&mut self.pool.items, *i, *n);
            self.forbid(*i, b);
        }
        for (i, n) in into.iter().filter(|e| e.1 > 0) {
            self.problem.add(&mut self.pool.load, *i, -n);
            pull(&mut self.pool.items, *i, *n);
            self.problem.add(&mut self.bins[b].load, *i, *n);
            push(&mut self.bins[b].items, *i, *n);
        }
    }

    /// Item `i` left node `b`: it may not go back for a few iterations.
    fn forbid(&mut self, i: usize, b: usize) {
        let until = self.iteration + 3 + self.rng.random_range(0..8);
        let now = self.iteration;
        let list = &mut self.tabu[b];
        list.retain(|(_, t)| *t > now);
        list.push((i, until));
    }

    fn forbidden(&self, i: usize, b: usize) -> bool {
        self.tabu[b]
            .iter()
            .any(|(j, t)| *j == i && *t > self.iteration)
    }

    fn tabu(&self, into: &Pick, b: usize) -> bool {
        into.iter()
            .filter(|e| e.1 > 0)
            .any(|(i, _)| self.forbidden(*i, b))
    }

    /// Whether node `b` holds its pods with `out` taken off and `into` put on (dimension by
    /// dimension, stopping at the first that overflows).
    fn feasible(&self, b: usize, out: &Pick, into: &Pick) -> bool {
        let p = self.problem;
        let load = &self.bins[b].load;
        (0..load.len()).all(|d| {
            let mut v = load[d];
            for (i, n) in out {
                v -= p.size[*i][d] * n;
            }
            for (i, n) in into {
                v += p.size[*i][d] * n;
            }
            v <= p.cap[d]
        })
    }

    /// The best swap in the first node (from a random start) that has one making the pool
    /// lighter; applies it.
    fn improve(&mut self) -> bool {
        let pool = sampled(&self.pool.items, &mut self.rng);
        let into_picks = picks(&pool, false);
        let nb = self.bins.len();
        let start = self.rng.random_range(0..nb);
        let mut scanned = 0;
        for k in 0..nb {
            if scanned >= SCAN_NODES {
                break;
            }
            let b = (start + k) % nb;
            // A node full in every weighed dimension cannot get heavier.
            if self.problem.weight_of_room(&self.bins[b].load) <= EPS {
                continue;
            }
            scanned += 1;
            // A swap that adds more weight than the node has room for cannot fit.
            let room = self.problem.weight_of_room(&self.bins[b].load);
            let mut best: Option<(f64, Pick, Pick)> = None;
            let items = sampled(&self.bins[b].items, &mut self.rng);
            for out in picks(&items, true) {
                let w_out = self.pick_weight(&out);
                for into in &into_picks {
                    let gain = self.pick_weight(into) - w_out;
                    if gain <= EPS
                        || gain > room + EPS
                        || best.as_ref().is_some_and(|(g, _, _)| *g >= gain)
                    {
                        continue;
                    }
                    if out
                        .iter()
                        .filter(|e| e.1 > 0)
                        .any(|o| into.iter().any(|i| i.1 > 0 && i.0 == o.0))
                    {
                        continue;
                    }
                    if !self.feasible(b, &out, into) || self.tabu(into, b) {
                        continue;
                    }
                    best = Some((gain, out, *into));
                }
            }
            if let Some((_, out, into)) = best {
                self.apply(b, &out, &into);
                return true;
            }
        }
        false
    }

    /// Refills the first node (from a random start) that a subset of its pods and the pool's
    /// fills better than now; the pods left out go to the pool.
    fn refill(&mut self) -> bool {
        let nb = self.bins.len();
        let start = self.rng.random_range(0..nb);
        let mut scanned = 0;
        for k in 0..nb {
            let b = (start + k) % nb;
            if self.problem.weight_of_room(&self.bins[b].load) <= EPS {
                continue;
            }
            if scanned >= SCAN_NODES {
                break;
            }
            scanned += 1;
            let mut candidates: Vec<(usize, i64)> = self.bins[b].items.clone();
            for (i, n) in &self.pool.items {
                if !self.forbidden(*i, b) {
                    push(&mut candidates, *i, *n);
                }
            }
            self.problem.heaviest_first(&mut candidates);
            let empty = self.problem.empty_bin();
            let filled = self.problem.best_fill(empty, &candidates, REFILL_STEPS);
            if self.problem.bin_weight(&filled) <= self.problem.bin_weight(&self.bins[b]) + EPS {
                continue;
            }
            let old = std::mem::replace(&mut self.bins[b], filled);
            for (i, n) in &old.items {
                let kept = self.bins[b]
                    .items
                    .iter()
                    .find(|e| e.0 == *i)
                    .map_or(0, |e| e.1);
                if *n > kept {
                    self.problem.add(&mut self.pool.load, *i, n - kept);
                    push(&mut self.pool.items, *i, n - kept);
                    self.forbid(*i, b);
                }
            }
            for (i, n) in self.bins[b].items.clone() {
                let had = old.items.iter().find(|e| e.0 == i).map_or(0, |e| e.1);
                if n > had {
                    self.problem.add(&mut self.pool.load, i, had - n);
                    pull(&mut self.pool.items, i, n - had);
                }
            }
            return true;
        }
        false
    }

    /// Repacks two random nodes from their pods and the pool's, each as full as it can be;
    /// kept unless the pool gets heavier (equal is kept: it moves the search along a plateau).
    fn repack_pair(&mut self) -> bool {
        let nb = self.bins.len();
        if nb < 2 {
            return false;
        }
        // One of them, usually, a node with room: that is where the pool's excess can go.
        let with_room: Vec<usize> = (0..nb)
            .filter(|b| self.problem.weight_of_room(&self.bins[*b].load) > EPS)
            .collect();
        let a = if !with_room.is_empty() && self.rng.random_range(0..4) != 0 {
            with_room[self.rng.random_range(0..with_room.len())]
        } else {
            self.rng.random_range(0..nb)
        };
        let mut b = self.rng.random_range(0..nb - 1);
        if b >= a {
            b += 1;
        }
        let mut candidates: Vec<(usize, i64)> = self.pool.items.clone();
        for bin in [a, b] {
            for (i, n) in &self.bins[bin].items {
                push(&mut candidates, *i, *n);
            }
        }
        // A random order: which of several equally full fills the search finds first varies,
        // so repeated repacks explore the plateau instead of cycling.
        shuffle(&mut candidates, &mut self.rng);
        let before =
            self.problem.bin_weight(&self.bins[a]) + self.problem.bin_weight(&self.bins[b]);
        let empty = self.problem.empty_bin();
        let first = self
            .problem
            .best_fill(empty.clone(), &candidates, REFILL_STEPS);
        for (i, n) in &first.items {
            pull(&mut candidates, *i, *n);
        }
        let second = self.problem.best_fill(empty, &candidates, REFILL_STEPS);
        let after = self.problem.bin_weight(&first) + self.problem.bin_weight(&second);
        if after < before - EPS {
            return false;
        }
        let mut pool = self.problem.empty_bin();
        for (i, n) in &candidates {
            let left = n - second.items.iter().find(|e| e.0 == *i).map_or(0, |e| e.1);
            if left > 0 {
                self.problem.add(&mut pool.load, *i, left);
                push(&mut pool.items, *i, left);
            }
        }
        self.pool = pool;
        self.bins[a] = first;
        self.bins[b] = second;
        after > before + EPS
    }

    /// No swap helps: put a random pool pod into the node where evicting the least weight makes
    /// room (not where it was just evicted from).
    fn eject(&mut self) {
        let pool_items = self.pool.items.clone();
        let (i, _) = pool_items[self.rng.random_range(0..pool_items.len())];
        let into: Pick = [(i, 1), (0, 0)];
        let mut best: Option<(f64, usize, Pick)> = None;
        let mut ties = 0u32;
        for b in 0..self.bins.len() {
            if self.tabu(&into, b) {
                continue;
            }
            let room = self.problem.weight_of_room(&self.bins[b].load);
            for out in picks(&self.bins[b].items, true) {
                if out.iter().any(|o| o.1 > 0 && o.0 == i) {
                    continue;
                }
                // Cheap checks first: a costlier eviction than the best loses anyway, and one
                // that frees too little weight cannot make room.
                let cost = self.pick_weight(&out);
                if best.as_ref().is_some_and(|(c, _, _)| cost > *c + EPS)
                    || self.problem.weight[i] > room + cost + EPS
                {
                    continue;
                }
                if !self.feasible(b, &out, &into) {
                    continue;
                }
                match &best {
                    Some((c, _, _)) if cost > *c + EPS => {}
                    Some((c, _, _)) if (cost - *c).abs() <= EPS => {
                        ties += 1;
                        if self.rng.random_range(0..=ties) == 0 {
                            best = Some((cost, b, out));
                        }
                    }
                    _ => {
                        ties = 0;
                        best = Some((cost, b, out));
                    }
                }
            }
        }
        if let Some((_, b, out)) = best {
            self.apply(b, &out, &into);
        }
    }

    /// The pool split onto two nodes, if the fullest fill of one leaves a rest that fits.
    fn split_pool(&self) -> Option<(Bin, Bin)> {
        let two_nodes = self
            .pool
            .load
            .iter()
            .zip(&self.problem.cap)
            .all(|(l, c)| *l <= 2 * c);
        if !two_nodes {
            return None;
        }
        let mut candidates = self.pool.items.clone();
        self.problem.heaviest_first(&mut candidates);
        let empty = self.problem.empty_bin();
        let first = self.problem.best_fill(empty, &candidates, REFILL_STEPS);
        let mut rest = self.pool.clone();
        for (i, n) in &first.items {
            self.problem.add(&mut rest.load, *i, -n);
            pull(&mut rest.items, *i, *n);
        }
        self.problem.fits(&rest.load).then_some((first, rest))
    }

    /// Runs until the pool fits on two nodes (returned) or the deadline.
    fn run(&mut self, deadline: Instant) -> Option<(Bin, Bin)> {
        loop {
            if let Some(split) = self.split_pool() {
                return Some(split);
            }
            self.iteration += 1;
            if self.iteration.is_multiple_of(32) && Instant::now() > deadline {
                return None;
            }
            // A full refill sweep costs a search per node: now and then, not every step.
            if self.improve() || (self.iteration.is_multiple_of(16) && self.refill()) {
                continue;
            }
            if self.rng.random_range(0..4) == 0 {
                self.eject();
            } else {
                self.repack_pair();
            }
        }
    }
}

/// Removes the nodes one at a time while the search can empty one, down to `lower_bound`.
pub(super) fn empty_nodes(
    problem: &Problem,
    mut best: Vec<Bin>,
    lower_bound: usize,
    deadline: Instant,
    seed: u64,
) -> Vec<Bin> {
    let mut rng = StdRng::seed_from_u64(seed);
    while best.len() > lower_bound.max(1) && best.len() >= 4 && Instant::now() < deadline {
        let mut bins = best.clone();
        bins.sort_by(|a, b| problem.bin_weight(a).total_cmp(&problem.bin_weight(b)));
        let mut pool = problem.empty_bin();
        for bin in bins.drain(..3) {
            for (i, n) in bin.items {
                problem.add(&mut pool.load, i, n);
                push(&mut pool.items, i, n);
            }
        }
        let nbins = bins.len();
        let mut search = Search {
            problem,
            bins,
            pool,
            tabu: vec![Vec::new(); nbins],
            rng: StdRng::seed_from_u64(rng.random()),
            iteration: 0,
        };
        let Some((first, rest)) = search.run(deadline) else {
            break;
        };
        let mut bins = search.bins;
        bins.push(first);
        bins.push(rest);
        bins.retain(|b| !b.items.is_empty());
        best = bins;
    }
    best
}

/// Nodes a packing needs, with what goes on each.
pub(super) fn bins_to_parts(
    problem: &Problem,
    bins: &[Bin],
) -> (Vec<Resources>, Vec<Vec<(usize, i64)>>) {
    (
        bins.iter().map(|b| problem.free(&b.load)).collect(),
        bins.iter().map(|b| b.items.clone()).collect(),
    )
}
