//! Bin packing onto new template nodes: first-fit decreasing over pod classes, placing whole
//! runs of identical pods at once, so a class of 1,000 pods costs one step per node it fills, not
//! one per pod. [`first_fit`] (no sorting) is the baseline the benchmarks compare against.

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
    let packed = pack(&sorted, capacity, max_nodes);
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
    pack(items, capacity, max_nodes)
}

fn pack(items: &[Item<'_>], capacity: &Resources, max_nodes: usize) -> Packing {
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
}
