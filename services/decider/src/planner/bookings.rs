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
    packing::{fit_count, take},
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
/// did not fit in full, how many of its pods found no room.
pub(crate) fn reserve(
    cluster: &Cluster<'_>,
    bins: &mut [Bin],
    reserved: &[Reservation],
) -> BTreeMap<String, i64> {
    let mut short = BTreeMap::new();
    for r in reserved {
        let own: HashSet<&str> = r.nodes.iter().map(String::as_str).collect();
        let pools: HashSet<usize> = r
            .pools
            .iter()
            .filter_map(|name| cluster.pools.iter().position(|p| &p.name == name))
            .collect();
        // Preference: the request's own nodes, its pools' booting nodes, then the rest.
        let rank = |kind: BinKind| match kind {
            BinKind::Existing(i) if own.contains(cluster.nodes[i].info.name.as_str()) => 0,
            BinKind::InFlight(p) | BinKind::New(p) if pools.contains(&p) => 1,
            BinKind::Existing(_) => 2,
            BinKind::InFlight(_) | BinKind::New(_) => 3,
        };
        let mut order: Vec<usize> = (0..bins.len()).collect();
        order.sort_by_key(|b| rank(bins[*b].kind));
        let mut missing = 0;
        for (class, count) in &r.pods {
            let demand: PodDemand = snapshot::pod_demand(class);
            let mut left = *count;
            for b in &order {
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
            missing += left;
        }
        if missing > 0 {
            short.insert(r.id.clone(), missing);
        }
    }
    short
}

/// Per ask, how many of its pods find no room on the nodes that exist and are usable now,
/// after the bookings of `input` took theirs (anywhere, booting nodes included). Asks are
/// answered in order, and an ask that fits keeps its room for the next ones.
pub fn room_now(input: &super::PlanInput<'_>, asks: &[Reservation]) -> Vec<i64> {
    let cluster = Cluster::build(input);
    let mut bins = cluster.bins();
    reserve(&cluster, &mut bins, input.bookings.reserved);
    let mut usable: Vec<Bin> = bins
        .into_iter()
        .filter(|b| matches!(b.kind, BinKind::Existing(_)))
        .collect();
    asks.iter()
        .map(|ask| {
            let mut trial = usable.clone();
            let missing: i64 = reserve(&cluster, &mut trial, std::slice::from_ref(ask))
                .values()
                .sum();
            if missing == 0 {
                usable = trial;
            }
            missing
        })
        .collect()
}
