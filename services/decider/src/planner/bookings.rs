//! Booked capacity: the pods a capacity request (a ProvisioningRequest, or `RequestCapacity`
//! over gRPC) was given room for and that have not arrived yet. Before pending pods are
//! placed, each booking's pods take their room — on the request's own nodes first, then on
//! nodes still booting for its pools, then anywhere they fit — so pending pods cannot plan on
//! that room, and the nodes holding it count as receivers (scale-down keeps them). A booking
//! that no longer fits anywhere is reported: its capacity was revoked.

use std::collections::{BTreeMap, HashSet};

use shoal_core::{fit::PodDemand, fit::constraint_misfit, snapshot};
use shoal_proto::v1 as pb;

use super::{
    Bin, BinKind, Cluster,
    packing::{fit_count, size_key, take},
};

/// Pods a capacity request booked and that have not consumed the booking yet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reservation {
    /// The capacity request.
    pub id: String,
    /// Pod shapes and how many of each still to come.
    pub pods: Vec<(pb::PodClass, i64)>,
    /// Nodes created for the request: its pods are placed there first.
    pub nodes: Vec<String>,
    /// Pools whose booting nodes were created for the request.
    pub pools: Vec<String>,
}

/// What a plan must know of capacity requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bookings<'a> {
    /// Booked capacity, placed before pending pods.
    pub reserved: &'a [Reservation],
    /// Pending classes whose pods consume a booking: their room is booked, so they are not
    /// planned again.
    pub consumers: Option<&'a HashSet<u64>>,
    /// This plan answers one capacity request (its pods are the pending ones): scale-up does
    /// not wait for cooldowns, stabilization windows or the pendingPods threshold, nor stop at
    /// the batch size — the request asked for all of it at once.
    pub request: bool,
}

impl Bookings<'_> {
    /// Whether pending class `id` consumes a booking.
    pub fn consumes(&self, id: u64) -> bool {
        self.consumers.is_some_and(|c| c.contains(&id))
    }
}

/// Places every reservation onto `bins` (taking their room) and returns, per reservation that
/// did not fit in full, how many of its pods found no room. Pods are placed largest first across
/// all reservations (first-fit decreasing, as the packer starts), each onto the first bin that
/// holds it in its request's order of preference.
pub(crate) fn reserve(
    cluster: &Cluster<'_>,
    bins: &mut [Bin],
    reserved: &[Reservation],
) -> BTreeMap<String, i64> {
    let mut short = BTreeMap::new();
    if reserved.is_empty() {
        return short;
    }
    let reference = cluster
        .pools
        .iter()
        .map(|p| &p.capacity)
        .chain(cluster.nodes.iter().map(|n| &n.facts.allocatable))
        .fold(shoal_core::Resources::default(), |acc, r| {
            shoal_core::Resources {
                cpu_millis: acc.cpu_millis.max(r.cpu_millis),
                memory_bytes: acc.memory_bytes.max(r.memory_bytes),
                ..acc
            }
        });
    let reference = &reference;
    let mut items: Vec<(usize, PodDemand, i64, f64)> = reserved
        .iter()
        .enumerate()
        .flat_map(|(r, res)| {
            res.pods.iter().map(move |(class, count)| {
                let demand = snapshot::pod_demand(class);
                let key = size_key(&demand.requests, reference);
                (r, demand, *count, key)
            })
        })
        .collect();
    items.sort_by(|a, b| b.3.total_cmp(&a.3).then(a.0.cmp(&b.0)));
    let mut orders: Vec<Option<Vec<usize>>> = vec![None; reserved.len()];
    for (r, demand, count, _) in items {
        let order = orders[r].get_or_insert_with(|| preference(cluster, bins, &reserved[r]));
        let mut left = count;
        for b in order.iter() {
            if left == 0 {
                break;
            }
            let n = fit_count(&bins[*b].free, &demand.requests).min(left);
            if n == 0 {
                continue;
            }
            let facts = cluster.bin_facts(bins[*b].kind);
            if constraint_misfit(&demand, &facts.labels, &facts.taints, facts.unschedulable)
                .is_some()
            {
                continue;
            }
            take(&mut bins[*b].free, &demand.requests, n);
            left -= n;
        }
        if left > 0 {
            *short.entry(reserved[r].id.clone()).or_insert(0) += left;
        }
    }
    short
}

/// The bins in `r`'s order of preference: the request's own nodes, its pools' booting nodes,
/// the other nodes, the other booting nodes.
fn preference(cluster: &Cluster<'_>, bins: &[Bin], r: &Reservation) -> Vec<usize> {
    let own: HashSet<&str> = r.nodes.iter().map(String::as_str).collect();
    let pools: HashSet<usize> = r
        .pools
        .iter()
        .filter_map(|name| cluster.pools.iter().position(|p| &p.name == name))
        .collect();
    let rank = |kind: BinKind| match kind {
        BinKind::Existing(i) if own.contains(cluster.nodes[i].info.name.as_str()) => 0,
        BinKind::InFlight(p) | BinKind::New(p) if pools.contains(&p) => 1,
        BinKind::Existing(_) => 2,
        BinKind::InFlight(_) | BinKind::New(_) => 3,
    };
    let mut order: Vec<usize> = (0..bins.len()).collect();
    order.sort_by_key(|b| rank(bins[*b].kind));
    order
}

/// Per ask, how many of its pods find no room on the nodes that exist and are usable now,
/// after the bookings of `input` took theirs (anywhere, booting nodes included). The asks are
/// placed together (largest pods first); those that do not fit in full drop out and the rest are
/// placed again, so every ask answered 0 keeps its room.
pub fn room_now(input: &super::PlanInput<'_>, asks: &[Reservation]) -> Vec<i64> {
    let cluster = Cluster::build(input);
    let mut bins = cluster.bins();
    reserve(&cluster, &mut bins, input.bookings.reserved);
    let usable: Vec<Bin> = bins
        .into_iter()
        .filter(|b| matches!(b.kind, BinKind::Existing(_)))
        .collect();
    let mut missing = vec![0i64; asks.len()];
    let mut live: Vec<usize> = (0..asks.len()).collect();
    while !live.is_empty() {
        let mut trial = usable.clone();
        let subset: Vec<Reservation> = live.iter().map(|i| asks[*i].clone()).collect();
        let short = reserve(&cluster, &mut trial, &subset);
        if short.is_empty() {
            break;
        }
        for i in &live {
            if let Some(m) = short.get(&asks[*i].id) {
                missing[*i] = *m;
            }
        }
        live.retain(|i| !short.contains_key(&asks[*i].id));
    }
    missing
}
