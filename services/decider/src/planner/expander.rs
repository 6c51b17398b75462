//! Choosing among pools that could take pending pods: a chain of expanders, as in Cluster
//! Autoscaler. Each expander keeps the options it likes best; the next breaks ties among those;
//! what is still tied at the end goes to the first pool by name (deterministic).

use serde::{Deserialize, Serialize};

/// One way of preferring a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expander {
    /// Least unused CPU and memory on the new nodes (the default).
    LeastWaste,
    /// Highest pool `weight`.
    Priority,
    /// Lowest price per pod placed.
    Price,
    /// Most pods placed.
    MostPods,
    /// Any, at random (seeded per decision, so a decision can be replayed).
    Random,
}

impl Expander {
    /// The name used in configuration and reasons.
    pub fn name(self) -> &'static str {
        match self {
            Expander::LeastWaste => "least-waste",
            Expander::Priority => "priority",
            Expander::Price => "price",
            Expander::MostPods => "most-pods",
            Expander::Random => "random",
        }
    }
}

/// A pool that could take some of the pending pods, and what it would take.
#[derive(Debug, Clone)]
pub struct ScaleOption {
    /// Pool name.
    pub pool: String,
    /// New nodes.
    pub nodes: usize,
    /// Pods those nodes take.
    pub pods: i64,
    /// Unused fraction of the new nodes' CPU and memory, averaged (0..1).
    pub waste: f64,
    /// Price of the new nodes per pod placed.
    pub price_per_pod: f64,
    /// Pool weight.
    pub weight: i32,
}

const EPSILON: f64 = 1e-9;

fn keep_best<F: Fn(&ScaleOption) -> f64>(
    candidates: Vec<usize>,
    options: &[ScaleOption],
    score: F,
) -> Vec<usize> {
    let best = candidates
        .iter()
        .map(|i| score(&options[*i]))
        .fold(f64::NEG_INFINITY, f64::max);
    candidates
        .into_iter()
        .filter(|i| score(&options[*i]) >= best - EPSILON)
        .collect()
}

/// The option the chain picks (an index into `options`) and why, e.g.
/// `least-waste: 12.5% waste`. `None` when there are no options.
pub fn choose(options: &[ScaleOption], chain: &[Expander], seed: u64) -> Option<(usize, String)> {
    if options.is_empty() {
        return None;
    }
    let mut candidates: Vec<usize> = (0..options.len()).collect();
    let mut why = Vec::new();
    for expander in chain {
        if candidates.len() == 1 && !why.is_empty() {
            break;
        }
        candidates = match expander {
            Expander::LeastWaste => keep_best(candidates, options, |o| -o.waste),
            Expander::Priority => keep_best(candidates, options, |o| o.weight as f64),
            Expander::Price => keep_best(candidates, options, |o| -o.price_per_pod),
            Expander::MostPods => keep_best(candidates, options, |o| o.pods as f64),
            Expander::Random => {
                // splitmix64 of the seed: cheap, stable, good enough to spread choices.
                let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                vec![candidates[(z % candidates.len() as u64) as usize]]
            }
        };
        let first = &options[candidates[0]];
        why.push(match expander {
            Expander::LeastWaste => format!("least-waste: {:.1}% waste", first.waste * 100.0),
            Expander::Priority => format!("priority: weight {}", first.weight),
            Expander::Price => format!("price: {:.4} per pod-hour", first.price_per_pod),
            Expander::MostPods => format!("most-pods: {} pods", first.pods),
            Expander::Random => "random".to_string(),
        });
    }
    let chosen = candidates
        .into_iter()
        .min_by(|a, b| options[*a].pool.cmp(&options[*b].pool))?;
    if why.is_empty() {
        why.push("only option".into());
    }
    Some((chosen, why.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(pool: &str, waste: f64, weight: i32, price: f64, pods: i64) -> ScaleOption {
        ScaleOption {
            pool: pool.into(),
            nodes: 1,
            pods,
            waste,
            price_per_pod: price,
            weight,
        }
    }

    #[test]
    fn the_chain_narrows_then_breaks_ties_by_name() {
        let options = [
            option("b", 0.10, 5, 0.2, 10),
            option("a", 0.10, 5, 0.3, 10),
            option("c", 0.05, 1, 0.1, 3),
        ];
        assert_eq!(
            choose(&options, &[Expander::LeastWaste], 0).map(|c| c.0),
            Some(2)
        );
        assert_eq!(
            choose(&options, &[Expander::Priority], 0).map(|c| c.0),
            Some(1),
            "a and b tie; a by name"
        );
        assert_eq!(
            choose(&options, &[Expander::Priority, Expander::Price], 0).map(|c| c.0),
            Some(0),
            "price breaks the priority tie"
        );
        assert_eq!(
            choose(&options, &[Expander::MostPods], 0).map(|c| c.0),
            Some(1)
        );
        let (_, why) = choose(&options, &[Expander::LeastWaste], 0).expect("one");
        assert_eq!(why, "least-waste: 5.0% waste");
        assert!(choose(&[], &[Expander::LeastWaste], 0).is_none());
        let picks: std::collections::BTreeSet<usize> = (0..32)
            .filter_map(|seed| choose(&options, &[Expander::Random], seed).map(|c| c.0))
            .collect();
        assert!(picks.len() > 1, "random spreads over seeds: {picks:?}");
    }
}
