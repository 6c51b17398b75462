//! Leader election with three real decider processes against a real etcd: failover after
//! kill -9, fencing of a paused (SIGSTOP) leader, recovery from an etcd outage, and hand-over on
//! SIGTERM.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use shoal_e2e::{EtcdReader, Running};
use shoal_runtime::leader::LeaderStatusRecord;
use shoal_testkit::{EtcdServer, wait_for};

const TTL_SECS: u64 = 3;

fn deciders(etcd: &EtcdServer) -> Vec<Running> {
    let ttl = format!("--set=election.leaseTtl={TTL_SECS}s");
    let mut replicas: Vec<Running> = (0..3)
        .map(|i| {
            Running::start(
                "shoal-decider",
                &format!("decider-{i}"),
                Some(etcd),
                &[&ttl, "--set=election.recordInterval=300ms"],
                &[],
            )
        })
        .collect();
    for replica in &mut replicas {
        replica.wait_ready();
    }
    replicas
}

fn leader_index(reader: &EtcdReader, replicas: &[Running]) -> Option<usize> {
    let record = reader.leader("decider")?;
    replicas.iter().position(|r| r.instance == record.holder)
}

fn wait_leader(
    reader: &EtcdReader,
    replicas: &[Running],
    not: Option<usize>,
    within: Duration,
) -> Option<usize> {
    wait_for(within, || {
        leader_index(reader, replicas).filter(|i| Some(*i) != not)
    })
}

fn logs(replicas: &[Running]) -> String {
    replicas
        .iter()
        .map(|r| format!("--- {}\n{}", r.instance, r.process.logs()))
        .collect()
}

/// Every leader record ever written: no record of an older term may follow one of a newer term,
/// and each term has exactly one holder. This is "no two leaders ever act", as etcd saw it.
fn assert_single_writer_history(
    reader: &EtcdReader,
    replicas: &[Running],
) -> Vec<LeaderStatusRecord> {
    let history: Vec<LeaderStatusRecord> = reader
        .history(&shoal_state::keys::leader_record("decider"))
        .iter()
        .map(|kv| serde_json::from_slice(&kv.value).expect("leader record JSON"))
        .collect();
    assert!(!history.is_empty(), "the leader wrote records");
    for pair in history.windows(2) {
        assert!(
            pair[0].term <= pair[1].term,
            "a write of term {} ({}) landed after term {} ({}): two leaders acted\n{}",
            pair[1].term,
            pair[1].holder,
            pair[0].term,
            pair[0].holder,
            logs(replicas)
        );
        if pair[0].term == pair[1].term {
            assert_eq!(pair[0].holder, pair[1].holder, "one holder per term");
        }
    }
    history
}

#[test]
fn kill_9_of_the_leader_fails_over_within_ttl_plus_one_second() {
    let etcd = EtcdServer::start();
    let reader = EtcdReader::new(&etcd);
    let mut replicas = deciders(&etcd);
    let first = wait_leader(&reader, &replicas, None, Duration::from_secs(10))
        .expect("a leader is elected");
    // Exactly one replica believes it leads.
    let leading = wait_for(Duration::from_secs(3), || {
        let count = replicas
            .iter()
            .filter(|r| r.metric("shoal_leader{service=\"decider\"}") == Some(1.0))
            .count();
        (count == 1).then_some(count)
    });
    assert_eq!(leading, Some(1), "exactly one leader\n{}", logs(&replicas));

    replicas[first].process.signal(Signal::SIGKILL);
    let killed = Instant::now();
    let next = wait_leader(
        &reader,
        &replicas,
        Some(first),
        Duration::from_secs(TTL_SECS + 1),
    );
    let took = killed.elapsed();
    let next = next.unwrap_or_else(|| panic!("no new leader within TTL+1s\n{}", logs(&replicas)));
    println!("failover after kill -9: {took:?} (TTL {TTL_SECS}s)");
    let acting = wait_for(Duration::from_secs(2), || {
        (replicas[next].metric("shoal_leader{service=\"decider\"}") == Some(1.0)).then_some(())
    });
    assert!(acting.is_some(), "the new leader acts\n{}", logs(&replicas));
    replicas[first].process.kill();
    assert_single_writer_history(&reader, &replicas);
}

#[test]
fn a_paused_leader_is_fenced_and_steps_down_when_it_resumes() {
    let etcd = EtcdServer::start();
    let reader = EtcdReader::new(&etcd);
    let replicas = deciders(&etcd);
    let paused = wait_leader(&reader, &replicas, None, Duration::from_secs(10))
        .expect("a leader is elected");

    replicas[paused].process.signal(Signal::SIGSTOP);
    let successor = wait_leader(
        &reader,
        &replicas,
        Some(paused),
        Duration::from_secs(TTL_SECS + 2),
    )
    .unwrap_or_else(|| {
        panic!(
            "no takeover while the leader is paused\n{}",
            logs(&replicas)
        )
    });
    std::thread::sleep(Duration::from_secs(1)); // the successor acts for a while
    replicas[paused].process.signal(Signal::SIGCONT);

    // The resumed replica notices at once that its term is over and stops acting.
    let stepped_down = wait_for(Duration::from_secs(3), || {
        let r = &replicas[paused];
        (r.metric("shoal_leader{service=\"decider\"}") == Some(0.0)
            && r.metric("shoal_leader_transitions_total{service=\"decider\",to=\"follower\"}")
                .unwrap_or(0.0)
                >= 1.0)
            .then_some(())
    });
    assert!(
        stepped_down.is_some(),
        "the resumed leader stepped down\n{}",
        logs(&replicas)
    );
    assert!(
        replicas[paused].process.logs().contains("leadership lost"),
        "{}",
        replicas[paused].process.logs()
    );
    assert_eq!(
        leader_index(&reader, &replicas),
        Some(successor),
        "the successor keeps leading"
    );
    std::thread::sleep(Duration::from_secs(1));

    let history = assert_single_writer_history(&reader, &replicas);
    let old = &replicas[paused].instance;
    let last_old = history
        .iter()
        .rposition(|r| &r.holder == old)
        .expect("the old leader wrote before pausing");
    assert!(
        history[last_old + 1..].iter().all(|r| &r.holder != old),
        "no write from the old leader after the successor's first"
    );
}

#[test]
fn an_etcd_outage_stops_every_leader_and_leadership_recovers() {
    let mut etcd = EtcdServer::start();
    let replicas = deciders(&etcd);
    {
        let reader = EtcdReader::new(&etcd);
        wait_leader(&reader, &replicas, None, Duration::from_secs(10))
            .expect("a leader is elected");
    }

    etcd.stop();
    std::thread::sleep(Duration::from_secs(10));
    // Without etcd no replica may believe it leads: the lease cannot be kept alive.
    for replica in &replicas {
        assert_eq!(
            replica.metric("shoal_leader{service=\"decider\"}"),
            Some(0.0),
            "{} still leads without etcd\n{}",
            replica.instance,
            logs(&replicas)
        );
    }
    etcd.restart();

    let reader = EtcdReader::new(&etcd);
    let recovered = wait_for(Duration::from_secs(TTL_SECS * 3 + 5), || {
        let leaders: Vec<_> = replicas
            .iter()
            .filter(|r| r.metric("shoal_leader{service=\"decider\"}") == Some(1.0))
            .collect();
        let holder = reader.leader("decider")?;
        (leaders.len() == 1 && leaders[0].instance == holder.holder).then_some(holder)
    });
    assert!(
        recovered.is_some(),
        "leadership recovered\n{}",
        logs(&replicas)
    );
    let mut replicas = replicas;
    for replica in &mut replicas {
        assert!(
            replica.process.try_status().is_none(),
            "{} exited\n{}",
            replica.instance,
            replica.process.logs()
        );
        assert!(
            !replica.process.logs().contains("panicked"),
            "{} panicked",
            replica.instance
        );
    }
}

#[test]
fn sigterm_hands_leadership_over_without_waiting_for_the_ttl() {
    let etcd = EtcdServer::start();
    let reader = EtcdReader::new(&etcd);
    let mut replicas = deciders(&etcd);
    let first = wait_leader(&reader, &replicas, None, Duration::from_secs(10))
        .expect("a leader is elected");
    replicas[first].process.signal(Signal::SIGTERM);
    let sent = Instant::now();
    let next = wait_leader(
        &reader,
        &replicas,
        Some(first),
        Duration::from_secs(TTL_SECS),
    );
    assert!(next.is_some(), "a standby leads\n{}", logs(&replicas));
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "hand-over took {:?}",
        sent.elapsed()
    );
    let status = replicas[first].process.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit 0 after SIGTERM: {status:?}"
    );
}
