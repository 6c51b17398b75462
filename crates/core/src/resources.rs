//! [`Resources`]: integer resource vectors with the arithmetic the planner needs.

use std::collections::BTreeMap;

/// CPU, memory, pods, ephemeral storage and extended resources, in integer base units.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    /// Millicores.
    pub cpu_millis: i64,
    /// Bytes.
    pub memory_bytes: i64,
    /// Pod slots.
    pub pods: i64,
    /// Bytes.
    pub ephemeral_storage_bytes: i64,
    /// Extended resources such as `nvidia.com/gpu`.
    pub extended: BTreeMap<String, i64>,
}

impl Resources {
    /// Component-wise sum (saturating: quantities never wrap).
    pub fn saturating_add(&self, other: &Resources) -> Resources {
        let mut extended = self.extended.clone();
        for (name, value) in &other.extended {
            let entry = extended.entry(name.clone()).or_default();
            *entry = entry.saturating_add(*value);
        }
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            pods: self.pods.saturating_add(other.pods),
            ephemeral_storage_bytes: self
                .ephemeral_storage_bytes
                .saturating_add(other.ephemeral_storage_bytes),
            extended,
        }
    }

    /// Component-wise difference, saturating at `i64::MIN`; extended resources that reach zero
    /// are dropped so that equal amounts compare equal.
    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        let mut extended = self.extended.clone();
        for (name, value) in &other.extended {
            let entry = extended.entry(name.clone()).or_default();
            *entry = entry.saturating_sub(*value);
        }
        extended.retain(|_, v| *v != 0);
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            pods: self.pods.saturating_sub(other.pods),
            ephemeral_storage_bytes: self
                .ephemeral_storage_bytes
                .saturating_sub(other.ephemeral_storage_bytes),
            extended,
        }
    }

    /// Every dimension multiplied by `n` (saturating).
    pub fn times(&self, n: i64) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_mul(n),
            memory_bytes: self.memory_bytes.saturating_mul(n),
            pods: self.pods.saturating_mul(n),
            ephemeral_storage_bytes: self.ephemeral_storage_bytes.saturating_mul(n),
            extended: self
                .extended
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_mul(n)))
                .collect(),
        }
    }

    /// True when every dimension is zero.
    pub fn is_zero(&self) -> bool {
        self.cpu_millis == 0
            && self.memory_bytes == 0
            && self.pods == 0
            && self.ephemeral_storage_bytes == 0
            && self.extended.values().all(|v| *v == 0)
    }

    /// True when `request` fits into `self` in every dimension.
    pub fn fits(&self, request: &Resources) -> bool {
        request.cpu_millis <= self.cpu_millis
            && request.memory_bytes <= self.memory_bytes
            && request.pods <= self.pods
            && request.ephemeral_storage_bytes <= self.ephemeral_storage_bytes
            && request
                .extended
                .iter()
                .all(|(name, value)| *value <= self.extended.get(name).copied().unwrap_or(0))
    }
}

impl From<&shoal_proto::v1::Resources> for Resources {
    fn from(r: &shoal_proto::v1::Resources) -> Self {
        Resources {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            pods: r.pods,
            ephemeral_storage_bytes: r.ephemeral_storage_bytes,
            extended: r.extended.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

impl From<&Resources> for shoal_proto::v1::Resources {
    fn from(r: &Resources) -> Self {
        shoal_proto::v1::Resources {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            pods: r.pods,
            ephemeral_storage_bytes: r.ephemeral_storage_bytes,
            extended: r.extended.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_mem(cpu: i64, mem: i64) -> Resources {
        Resources {
            cpu_millis: cpu,
            memory_bytes: mem,
            pods: 1,
            ..Default::default()
        }
    }

    #[test]
    fn fits_checks_every_dimension() {
        let node = Resources {
            pods: 110,
            ..cpu_mem(4000, 8 << 30)
        };
        assert!(node.fits(&cpu_mem(4000, 8 << 30)));
        assert!(!node.fits(&cpu_mem(4001, 1)));
        assert!(!node.fits(&cpu_mem(1, (8 << 30) + 1)));
        let mut gpu = cpu_mem(1, 1);
        gpu.extended.insert("nvidia.com/gpu".into(), 1);
        assert!(
            !node.fits(&gpu),
            "a node without GPUs cannot take a GPU pod"
        );
    }

    #[test]
    fn sums_merge_extended_resources() {
        let mut a = cpu_mem(100, 1);
        a.extended.insert("x".into(), 1);
        let mut b = cpu_mem(200, 2);
        b.extended.insert("x".into(), 2);
        b.extended.insert("y".into(), 5);
        let sum = a.saturating_add(&b);
        assert_eq!(sum.cpu_millis, 300);
        assert_eq!(sum.extended["x"], 3);
        assert_eq!(sum.extended["y"], 5);
        assert_eq!(
            cpu_mem(i64::MAX, 0)
                .saturating_add(&cpu_mem(1, 0))
                .cpu_millis,
            i64::MAX
        );
    }

    #[test]
    fn subtraction_undoes_addition() {
        let mut a = cpu_mem(100, 1);
        a.extended.insert("x".into(), 1);
        let mut b = cpu_mem(200, 2);
        b.extended.insert("x".into(), 2);
        assert_eq!(a.saturating_add(&b).saturating_sub(&b), a);
        assert!(a.saturating_sub(&a).is_zero());
        assert_eq!(a.saturating_sub(&a), Resources::default());
        assert_eq!(
            cpu_mem(3, 5).times(3),
            Resources {
                pods: 3,
                ..cpu_mem(9, 15)
            }
        );
    }

    #[test]
    fn proto_round_trip() {
        let mut r = cpu_mem(1500, 3 << 30);
        r.extended.insert("nvidia.com/gpu".into(), 2);
        let p = shoal_proto::v1::Resources::from(&r);
        assert_eq!(Resources::from(&p), r);
    }
}
