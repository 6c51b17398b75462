//! `/metrics`: the simulated cluster as node-exporter, kube-state-metrics and cAdvisor would
//! expose it, with the same metric names and labels, so PromQL written for a real cluster works
//! on the simulator.
//!
//! Per-pod usage comes from annotations on running pods (`sim.shoal.dev/cpu-usage: "250m"`,
//! `sim.shoal.dev/memory-usage: "200Mi"`), which scenarios change over time. CPU counters
//! integrate usage over time, so `rate()` returns the annotated cores. Every series carries the
//! node (and the pod) as labels because one simulator stands for many scrape targets: scrape it
//! with `honor_labels: true`.
//!
//! kube-state-metrics emits every phase/condition with 0 or 1; the simulator emits only the
//! series whose value is 1, which keeps 300k pods cheap and leaves sums and counts unchanged.

use std::{
    collections::HashMap,
    fmt::Write,
    sync::{Arc, Mutex},
    time::Instant,
};

use serde_json::Value;
use shoal_core::{parse_cpu_millis, parse_memory_bytes};

use crate::{
    resources::by_kind,
    store::{ListPage, Store},
};

/// Usage annotation: CPU in cores (Kubernetes quantity).
pub const CPU_USAGE: &str = "sim.shoal.dev/cpu-usage";
/// Usage annotation: memory working set (Kubernetes quantity).
pub const MEMORY_USAGE: &str = "sim.shoal.dev/memory-usage";

#[derive(Default)]
struct Counter {
    seconds: f64,
    rate: f64,
    at: Option<Instant>,
}

impl Counter {
    /// Integrates the previous rate up to `now`, then switches to `rate`.
    fn advance(&mut self, now: Instant, rate: f64) -> f64 {
        if let Some(at) = self.at {
            self.seconds += self.rate * now.duration_since(at).as_secs_f64();
        }
        self.rate = rate;
        self.at = Some(now);
        self.seconds
    }
}

/// CPU counters that survive between scrapes.
#[derive(Default)]
pub struct Exporter {
    pods: Mutex<HashMap<(String, String, String), Counter>>,
    nodes: Mutex<HashMap<(String, usize, &'static str), Counter>>,
}

fn annotation(v: &Value, key: &str) -> Option<String> {
    v.pointer("/metadata/annotations")?
        .get(key)?
        .as_str()
        .map(str::to_string)
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Exporter {
    /// Renders the exposition text for the current state of `store`.
    pub fn render(&self, store: &Arc<Store>) -> String {
        let (Some(nodes), Some(pods)) = (by_kind("Node"), by_kind("Pod")) else {
            return String::new();
        };
        let now = Instant::now();
        let node_list = store.list(nodes, &ListPage::default(), &|_| true).items;
        let pod_list = store.list(pods, &ListPage::default(), &|_| true).items;
        let mut out = String::with_capacity(256 * (node_list.len() + pod_list.len()) + 4096);
        let mut node_cpu_busy: HashMap<String, f64> = HashMap::new();
        let mut node_mem_used: HashMap<String, f64> = HashMap::new();

        let _ = writeln!(out, "# TYPE kube_pod_status_phase gauge");
        let mut requests = String::new();
        let mut cadvisor_cpu = String::new();
        let mut cadvisor_mem = String::new();
        {
            let mut counters = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            let mut alive = std::collections::HashSet::new();
            for pod in &pod_list {
                let v = pod.value();
                let (ns, name) = (escape(&pod.namespace), escape(&pod.name));
                let phase = v
                    .pointer("/status/phase")
                    .and_then(Value::as_str)
                    .unwrap_or("Pending");
                let uid = v
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let node = escape(
                    v.pointer("/spec/nodeName")
                        .and_then(Value::as_str)
                        .unwrap_or_default(),
                );
                let _ = writeln!(
                    out,
                    "kube_pod_status_phase{{namespace=\"{ns}\",pod=\"{name}\",uid=\"{uid}\",phase=\"{phase}\"}} 1"
                );
                for c in v
                    .pointer("/spec/containers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let container = escape(c["name"].as_str().unwrap_or_default());
                    if let Some(req) = c.pointer("/resources/requests").and_then(Value::as_object) {
                        for (resource, q) in req {
                            let q = q.as_str().unwrap_or_default();
                            let (value, unit) = match resource.as_str() {
                                "cpu" => (parse_cpu_millis(q).unwrap_or(0) as f64 / 1000.0, "core"),
                                _ => (parse_memory_bytes(q).unwrap_or(0) as f64, "byte"),
                            };
                            let _ = writeln!(
                                requests,
                                "kube_pod_container_resource_requests{{namespace=\"{ns}\",pod=\"{name}\",uid=\"{uid}\",container=\"{container}\",node=\"{node}\",resource=\"{}\",unit=\"{unit}\"}} {value}",
                                escape(resource)
                            );
                        }
                    }
                }
                if phase != "Running" || node.is_empty() {
                    continue;
                }
                let cores = annotation(&v, CPU_USAGE)
                    .and_then(|q| parse_cpu_millis(&q).ok())
                    .unwrap_or(0) as f64
                    / 1000.0;
                let memory = annotation(&v, MEMORY_USAGE)
                    .and_then(|q| parse_memory_bytes(&q).ok())
                    .unwrap_or(0) as f64;
                let key = (pod.namespace.clone(), pod.name.clone(), uid.to_string());
                let seconds = counters.entry(key.clone()).or_default().advance(now, cores);
                alive.insert(key);
                *node_cpu_busy.entry(node.clone()).or_default() += cores;
                *node_mem_used.entry(node.clone()).or_default() += memory;
                // cAdvisor reports per container; the simulator attributes usage to the first.
                let container = escape(
                    v.pointer("/spec/containers/0/name")
                        .and_then(Value::as_str)
                        .unwrap_or("app"),
                );
                let labels = format!(
                    "namespace=\"{ns}\",pod=\"{name}\",container=\"{container}\",node=\"{node}\",image=\"\""
                );
                let _ = writeln!(
                    cadvisor_cpu,
                    "container_cpu_usage_seconds_total{{{labels}}} {seconds}"
                );
                let _ = writeln!(
                    cadvisor_mem,
                    "container_memory_working_set_bytes{{{labels}}} {memory}"
                );
            }
            counters.retain(|k, _| alive.contains(k));
        }
        let _ = writeln!(out, "# TYPE kube_pod_container_resource_requests gauge");
        out.push_str(&requests);
        let _ = writeln!(out, "# TYPE container_cpu_usage_seconds_total counter");
        out.push_str(&cadvisor_cpu);
        let _ = writeln!(out, "# TYPE container_memory_working_set_bytes gauge");
        out.push_str(&cadvisor_mem);

        let mut allocatable = String::new();
        let mut conditions = String::new();
        let mut node_cpu = String::new();
        let mut mem_total = String::new();
        let mut mem_available = String::new();
        let mut counters = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        for node in &node_list {
            let v = node.value();
            let name = escape(&node.name);
            let alloc = v
                .pointer("/status/allocatable")
                .or_else(|| v.pointer("/status/capacity"));
            let cpu = alloc
                .and_then(|a| a.get("cpu"))
                .and_then(Value::as_str)
                .and_then(|q| parse_cpu_millis(q).ok())
                .unwrap_or(0);
            let memory = alloc
                .and_then(|a| a.get("memory"))
                .and_then(Value::as_str)
                .and_then(|q| parse_memory_bytes(q).ok())
                .unwrap_or(0);
            let pods_cap = alloc
                .and_then(|a| a.get("pods"))
                .and_then(Value::as_str)
                .and_then(|q| q.parse::<i64>().ok())
                .unwrap_or(0);
            let _ = writeln!(
                allocatable,
                "kube_node_status_allocatable{{node=\"{name}\",resource=\"cpu\",unit=\"core\"}} {}",
                cpu as f64 / 1000.0
            );
            let _ = writeln!(
                allocatable,
                "kube_node_status_allocatable{{node=\"{name}\",resource=\"memory\",unit=\"byte\"}} {memory}"
            );
            let _ = writeln!(
                allocatable,
                "kube_node_status_allocatable{{node=\"{name}\",resource=\"pods\",unit=\"integer\"}} {pods_cap}"
            );
            let ready = v
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .and_then(|c| c["status"].as_str())
                .unwrap_or("unknown")
                .to_lowercase();
            let _ = writeln!(
                conditions,
                "kube_node_status_condition{{node=\"{name}\",condition=\"Ready\",status=\"{ready}\"}} 1"
            );
            // node-exporter: per-CPU idle/user seconds; busy cores spread evenly over the CPUs.
            let cpus = (cpu / 1000).max(1) as usize;
            let busy = node_cpu_busy
                .get(&name)
                .copied()
                .unwrap_or(0.0)
                .min(cpus as f64);
            for i in 0..cpus {
                let user_rate = busy / cpus as f64;
                let user = counters
                    .entry((node.name.clone(), i, "user"))
                    .or_default()
                    .advance(now, user_rate);
                let idle = counters
                    .entry((node.name.clone(), i, "idle"))
                    .or_default()
                    .advance(now, 1.0 - user_rate);
                let _ = writeln!(
                    node_cpu,
                    "node_cpu_seconds_total{{instance=\"{name}\",node=\"{name}\",cpu=\"{i}\",mode=\"idle\"}} {idle}"
                );
                let _ = writeln!(
                    node_cpu,
                    "node_cpu_seconds_total{{instance=\"{name}\",node=\"{name}\",cpu=\"{i}\",mode=\"user\"}} {user}"
                );
            }
            let used = node_mem_used.get(&name).copied().unwrap_or(0.0);
            let _ = writeln!(
                mem_total,
                "node_memory_MemTotal_bytes{{instance=\"{name}\",node=\"{name}\"}} {memory}"
            );
            let _ = writeln!(
                mem_available,
                "node_memory_MemAvailable_bytes{{instance=\"{name}\",node=\"{name}\"}} {}",
                (memory as f64 - used).max(0.0)
            );
        }
        let names: std::collections::HashSet<&str> =
            node_list.iter().map(|n| n.name.as_str()).collect();
        counters.retain(|k, _| names.contains(k.0.as_str()));
        for (kind, metric, body) in [
            ("gauge", "kube_node_status_allocatable", &allocatable),
            ("gauge", "kube_node_status_condition", &conditions),
            ("counter", "node_cpu_seconds_total", &node_cpu),
            ("gauge", "node_memory_MemTotal_bytes", &mem_total),
            ("gauge", "node_memory_MemAvailable_bytes", &mem_available),
        ] {
            let _ = writeln!(out, "# TYPE {metric} {kind}");
            out.push_str(body);
        }
        out
    }
}
