//! Bin packing onto new template nodes. [`pack`] is what the planner uses: first-fit decreasing
//! over pod classes (whole runs of identical pods at once, so a class of 1,000 pods costs one step
//! per node it fills), improved within a time budget by the search in [`search`] towards the
//! lower bound. [`first_fit_decreasing`] is the packing Cluster Autoscaler and Karpenter use, and
//! [`first_fit`] (no sorting) the naive baseline; the benchmarks compare against both.

mod search;

use std::time::{Duration, Instant};

use shoal_core::Resources;

/// How many pods requesting `request` fit into `free` (every dimension, a pod slot each).
pub fn fit_count(free: &Resources, request: &Resources) -> i64 {
    let mut n = i64::MAX;
    let mut dim = |have: i64, want: i64| {
        if want > 0 {
            n = n.min(have.max(0) / want);
        } else if have < 0 {
            n = 0;
        }
    };
    dim(free.cpu_millis, request.cpu_millis);
    dim(free.memory_bytes, request.memory_bytes);
    dim(
        free.ephemeral_storage_bytes,
        request.ephemeral_storage_bytes,
    );
    dim(free.pods, request.pods.max(1));
    for (name, want) in &request.extended {
        dim(free.extended.get(name).copied().unwrap_or(0), *want);
    }
    n
}

/// Subtracts `n` pods' requests from `free` in place.
pub fn take(free: &mut Resources, request: &Resources, n: i64) {
    free.cpu_millis -= request.cpu_millis * n;
    free.memory_bytes -= request.memory_bytes * n;
    free.ephemeral_storage_bytes -= request.ephemeral_storage_bytes * n;
    free.pods -= request.pods.max(1) * n;
    for (name, want) in &request.extended {
        *free.extended.entry(name.clone()).or_default() -= want * n;
    }
}

/// Pods of one class to pack.
#[derive(Debug, Clone)]
pub struct Item<'a> {
    /// Which class (caller's index).
    pub class: usize,
    /// Requests of one pod.
    pub request: &'a Resources,
    /// How many.
    pub count: i64,
}

/// The result of packing onto new nodes of one shape.
#[derive(Debug, Clone, Default)]
pub struct Packing {
    /// Free resources left on each new node.
    pub nodes: Vec<Resources>,
    /// Pods placed per item (same order as the items).
    pub placed: Vec<i64>,
}

impl Packing {
    /// Pods placed in all.
    pub fn pods(&self) -> i64 {
        self.placed.iter().sum()
    }
}

/// How long [`pack`] may search by default, per decision.
pub const DEFAULT_BUDGET: Duration = Duration::from_millis(20);

/// What [`pack`] found, and what it is measured against.
#[derive(Debug, Clone, Default)]
pub struct Packed {
    /// The packing used.
    pub packing: Packing,
    /// What goes on each new node: (item index, pods), same order as `packing.nodes`.
    pub contents: Vec<Vec<(usize, i64)>>,
    /// Nodes first-fit decreasing needs for the same pods (within the same node cap).
    pub first_fit_decreasing: usize,
    /// No packing of these pods needs fewer nodes ([`lower_bound`]).
    pub lower_bound: i64,
}

/// Packs `items` onto at most `max_nodes` new nodes of `capacity`, as few as it can find within
/// `budget`: first-fit decreasing, then minimum bin slack, then the node-emptying search, keeping
/// the best packing found (fewest nodes; when the cap binds, the most pods). `seed` makes the
/// search repeatable for a given budget.
pub fn pack(
    items: &[Item<'_>],
    capacity: &Resources,
    max_nodes: usize,
    budget: Duration,
    seed: u64,
) -> Packed {
    let deadline = Instant::now() + budget;
    let ffd = first_fit_decreasing(items, capacity, max_nodes);
    let bound = lower_bound(items, capacity);
    let problem = search::Problem::new(items, capacity);
    let mut best = problem.first_fit_decreasing();
    if (best.len() as i64) > bound {
        // A quarter of the budget at most: the search gains more per millisecond after that.
        let mbs = problem.minimum_bin_slack(Instant::now() + budget / 4);
        if mbs.len() < best.len() {
            best = mbs;
        }
    }
    if (best.len() as i64) > bound {
        best = search::empty_nodes(&problem, best, bound.max(0) as usize, deadline, seed);
    }
    if best.len() > max_nodes {
        // The cap binds: the fullest nodes place the most pods.
        best.sort_by(|a, b| problem.bin_weight(b).total_cmp(&problem.bin_weight(a)));
        best.truncate(max_nodes);
    }
    let (nodes, contents) = search::bins_to_parts(&problem, &best);
    let mut placed = vec![0; items.len()];
    for node in &contents {
        for (i, n) in node {
            placed[*i] += n;
        }
    }
    let found = Packing { nodes, placed };
    // Keep FFD when the cap binds and it places more (it fills nodes in its own order).
    let (packing, contents) = if ffd.pods() > found.pods() {
        (ffd.clone(), Vec::new())
    } else {
        (found, contents)
    };
    Packed {
        packing,
        contents,
        first_fit_decreasing: ffd.nodes.len(),
        lower_bound: bound,
    }
}

/// Sort key for "largest first": the pod's larger share of one node (CPU or memory).
pub fn size_key(request: &Resources, capacity: &Resources) -> f64 {
    let share = |want: i64, have: i64| {
        if have > 0 {
            want as f64 / have as f64
        } else {
            0.0
        }
    };
    share(request.cpu_millis, capacity.cpu_millis)
        .max(share(request.memory_bytes, capacity.memory_bytes))
}

/// First-fit decreasing: items are taken largest first ([`size_key`]). Opens at most
/// `max_nodes` nodes of `capacity`; pods that do not fit stay unplaced. `placed` follows the
/// order of `items`.
pub fn first_fit_decreasing(items: &[Item<'_>], capacity: &Resources, max_nodes: usize) -> Packing {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|a, b| {
        size_key(items[*b].request, capacity).total_cmp(&size_key(items[*a].request, capacity))
    });
    let sorted: Vec<Item<'_>> = order.iter().map(|i| items[*i].clone()).collect();
    let packed = first_fit_in_order(&sorted, capacity, max_nodes);
    let mut placed = vec![0; items.len()];
    for (k, i) in order.iter().enumerate() {
        placed[*i] = packed.placed[k];
    }
    Packing {
        nodes: packed.nodes,
        placed,
    }
}

/// First fit in the given order (the unsorted baseline).
pub fn first_fit(items: &[Item<'_>], capacity: &Resources, max_nodes: usize) -> Packing {
    first_fit_in_order(items, capacity, max_nodes)
}

fn first_fit_in_order(items: &[Item<'_>], capacity: &Resources, max_nodes: usize) -> Packing {
    let mut nodes: Vec<Resources> = Vec::new();
    // Nodes that may still take something (by index into `nodes`); full ones drop out.
    let mut open: Vec<usize> = Vec::new();
    let mut placed = Vec::with_capacity(items.len());
    let smallest_cpu = items
        .iter()
        .map(|i| i.request.cpu_millis)
        .min()
        .unwrap_or(0);
    let smallest_memory = items
        .iter()
        .map(|i| i.request.memory_bytes)
        .min()
        .unwrap_or(0);
    for item in items {
        let mut left = item.count;
        let mut i = 0;
        while left > 0 && i < open.len() {
            let free = &mut nodes[open[i]];
            let n = fit_count(free, item.request).min(left);
            if n > 0 {
                take(free, item.request, n);
                left -= n;
            }
            // Close nodes nothing more can go on.
            if free.pods <= 0
                || free.cpu_millis < smallest_cpu
                || free.memory_bytes < smallest_memory
            {
                open.swap_remove(i);
            } else {
                i += 1;
            }
        }
        let per_node = fit_count(capacity, item.request);
        while left > 0 && per_node > 0 && nodes.len() < max_nodes {
            let mut free = capacity.clone();
            let n = per_node.min(left);
            take(&mut free, item.request, n);
            left -= n;
            let full = free.pods <= 0
                || free.cpu_millis < smallest_cpu
                || free.memory_bytes < smallest_memory;
            nodes.push(free);
            if !full {
                open.push(nodes.len() - 1);
            }
        }
        placed.push(item.count - left);
    }
    Packing { nodes, placed }
}

/// The lower bound on nodes: total requests over one node's capacity, in the tightest
/// dimension (CPU, memory, pod slots), rounded up.
pub fn lower_bound(items: &[Item<'_>], capacity: &Resources) -> i64 {
    let total = items.iter().fold(Resources::default(), |acc, i| {
        acc.saturating_add(
            &Resources {
                pods: i.request.pods.max(1),
                ..i.request.clone()
            }
            .times(i.count),
        )
    });
    let need = |want: i64, have: i64| {
        if have > 0 {
            (want + have - 1) / have
        } else {
            0
        }
    };
    need(total.cpu_millis, capacity.cpu_millis)
        .max(need(total.memory_bytes, capacity.memory_bytes))
        .max(need(total.pods, capacity.pods))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(cpu: i64, mem: i64) -> Resources {
        Resources {
            cpu_millis: cpu,
            memory_bytes: mem,
            pods: 1,
            ..Default::default()
        }
    }

    fn node() -> Resources {
        Resources {
            pods: 110,
            ephemeral_storage_bytes: 1 << 40,
            ..r(4000, 8 << 30)
        }
    }

    #[test]
    fn counts_fit_in_the_tightest_dimension() {
        assert_eq!(fit_count(&node(), &r(1000, 1 << 30)), 4);
        assert_eq!(fit_count(&node(), &r(100, 3 << 30)), 2);
        let mut small = node();
        small.pods = 3;
        assert_eq!(fit_count(&small, &r(1, 1)), 3);
        let mut gpu = r(100, 1);
        gpu.extended.insert("nvidia.com/gpu".into(), 1);
        assert_eq!(fit_count(&node(), &gpu), 0, "no GPUs on the node");
    }

    #[test]
    fn ffd_packs_runs_and_respects_the_node_cap() {
        let (big, small) = (r(3000, 1 << 30), r(1000, 1 << 30));
        let items = [
            Item {
                class: 1,
                request: &small,
                count: 4,
            },
            Item {
                class: 0,
                request: &big,
                count: 4,
            },
        ];
        let p = first_fit_decreasing(&items, &node(), 10);
        assert_eq!(p.nodes.len(), 4, "each 3-CPU pod pairs with a 1-CPU pod");
        assert_eq!(p.placed, [4, 4]);
        assert_eq!(lower_bound(&items, &node()), 4);
        let capped = first_fit_decreasing(&items, &node(), 2);
        assert_eq!(
            capped.placed,
            [2, 2],
            "big first: two nodes of one big and one small pod"
        );
        // Unsorted, the small pods fill a whole node first and the big ones need their own.
        assert_eq!(first_fit(&items, &node(), 10).nodes.len(), 5);
    }

    /// A packing is real: every node's pods fit its capacity in every dimension, and the
    /// placed counts match the contents.
    fn assert_valid(items: &[Item<'_>], capacity: &Resources, packed: &Packed) {
        let mut placed = vec![0; items.len()];
        for node in &packed.contents {
            let mut free = capacity.clone();
            for (i, n) in node {
                assert!(fit_count(&free, items[*i].request) >= *n, "over capacity");
                take(&mut free, items[*i].request, *n);
                placed[*i] += n;
            }
        }
        assert_eq!(placed, packed.packing.placed);
        assert_eq!(packed.contents.len(), packed.packing.nodes.len());
    }

    #[test]
    fn finds_the_exact_triplets_first_fit_decreasing_misses() {
        // Six triplets that each fill a node exactly; FFD pairs the big items badly.
        let sizes = [
            [460, 270, 270],
            [450, 300, 250],
            [440, 290, 270],
            [430, 310, 260],
            [420, 320, 260],
            [410, 330, 260],
        ];
        let requests: Vec<Resources> = sizes.iter().flatten().map(|cpu| r(*cpu, 0)).collect();
        let items: Vec<Item<'_>> = requests
            .iter()
            .enumerate()
            .map(|(class, request)| Item {
                class,
                request,
                count: 1,
            })
            .collect();
        let capacity = Resources {
            pods: 110,
            ..r(1000, 0)
        };
        let packed = pack(&items, &capacity, 100, Duration::from_secs(5), 1);
        assert_valid(&items, &capacity, &packed);
        assert_eq!(packed.lower_bound, 6);
        assert!(packed.first_fit_decreasing > 6, "FFD is not optimal here");
        assert_eq!(packed.packing.nodes.len(), 6, "every node exactly full");
        assert_eq!(packed.packing.pods(), 18);
    }

    #[test]
    fn packs_in_every_dimension_and_within_the_cap() {
        let mut gpu = r(500, 1 << 30);
        gpu.extended.insert("nvidia.com/gpu".into(), 1);
        let (cpu_heavy, memory_heavy) = (r(3000, 1 << 30), r(500, 6 << 30));
        let items = [
            Item {
                class: 0,
                request: &cpu_heavy,
                count: 7,
            },
            Item {
                class: 1,
                request: &memory_heavy,
                count: 7,
            },
            Item {
                class: 2,
                request: &gpu,
                count: 5,
            },
        ];
        let mut capacity = node();
        capacity.extended.insert("nvidia.com/gpu".into(), 2);
        let packed = pack(&items, &capacity, 100, Duration::from_millis(50), 1);
        assert_valid(&items, &capacity, &packed);
        assert_eq!(packed.packing.pods(), 19);
        assert!(packed.packing.nodes.len() as i64 >= packed.lower_bound);
        assert!(packed.packing.nodes.len() <= packed.first_fit_decreasing);
        // A CPU-heavy and a memory-heavy pod share a node (4 CPU, 8 GiB): 7 nodes, GPUs two
        // per node on top.
        assert_eq!(packed.packing.nodes.len(), 7);

        let capped = pack(&items, &capacity, 3, Duration::from_millis(50), 1);
        assert_valid(&items, &capacity, &capped);
        assert_eq!(capped.packing.nodes.len(), 3);
        assert!(capped.packing.pods() >= 6, "the fullest nodes are kept");
    }
}
