//! Unit tests of the cluster state machine (`state_machine/mod.rs`).

use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::cluster::error::{CommandError, StepError};
use crate::cluster::events::{Event, Phase, TransitionKind};
use crate::cluster::health::ProbeError;
use crate::cluster::replication::{NodeSample, ReplicationRow};
use crate::config::Backend;

fn backends(n: usize) -> Vec<Backend> {
    (0..n)
        .map(|i| Backend {
            host: "127.0.0.1".into(),
            port: 5000 + i as u16,
            weight: 1.0,
            application_name: format!("node{i}"),
            data_directory: String::new(),
            no_failover: false,
            trigger_file: String::new(),
        })
        .collect()
}

fn adm(n: usize) -> Admission {
    Admission {
        auto_failback: true,
        sr_enabled: true,
        policy: LagPolicy {
            delay_threshold_bytes: 1 << 20,
            delay_threshold_time: Duration::from_secs(10),
            half_weight_lag_bytes: 16 << 20,
            half_weight_lag: Duration::from_secs(1),
            prefer_lower_delay_standby: true,
        },
        nodes: backends(n)
            .into_iter()
            .map(|b| NodeSettings {
                weight: b.weight,
                host: b.host,
                port: b.port,
                application_name: b.application_name,
            })
            .collect(),
    }
}

fn probe_error(message: &str, alive: bool) -> ProbeError {
    ProbeError {
        message: message.into(),
        alive,
        timed_out: false,
    }
}

fn ok(in_recovery: bool) -> Round {
    Round {
        outcome: Ok(in_recovery),
        retries: 0,
        duration: Duration::from_millis(3),
        started: Instant::now(),
    }
}

fn failed() -> Round {
    Round {
        outcome: Err(probe_error("connection refused", false)),
        retries: 2,
        duration: Duration::from_millis(9),
        started: Instant::now(),
    }
}

/// Primary 0, standbys 1 and 2, all checked once.
fn started() -> Owner {
    let mut o = Owner::new(ClusterSnapshot::initial(&backends(3)));
    let now = SystemTime::now();
    o.round_finished(NodeId::new(0), ok(false), now, adm(3));
    o.round_finished(NodeId::new(1), ok(true), now, adm(3));
    o.round_finished(NodeId::new(2), ok(true), now, adm(3));
    o
}

fn primary_sample(lsn: u64, standbys: &[(&str, &str)]) -> NodeSample {
    NodeSample {
        in_recovery: false,
        current_lsn: Some(lsn),
        timeline: Some(1),
        replication: standbys
            .iter()
            .map(|(name, state)| ReplicationRow {
                application_name: name.to_string(),
                state: state.to_string(),
                sync_state: "async".into(),
                replay_lag: None,
            })
            .collect(),
        ..NodeSample::default()
    }
}

fn standby_sample(replay: u64) -> NodeSample {
    NodeSample {
        in_recovery: true,
        receive_lsn: Some(replay),
        replay_lsn: Some(replay),
        replay_paused: Some(false),
        timeline: Some(1),
        receiver_status: Some("streaming".into()),
        ..NodeSample::default()
    }
}

fn round(at: Instant, checks: Vec<NodeCheck>) -> SrRound {
    SrRound { at, checks }
}

fn weights(o: &Owner) -> Vec<f64> {
    o.snap.nodes.iter().map(|n| n.effective_weight).collect()
}

#[test]
fn startup_admits_primary_and_standbys_as_waiting() {
    let mut o = started();
    assert_eq!(o.snap.primary, Some(NodeId::new(0)));
    assert!(o.snap.has_primary());
    for n in &o.snap.nodes {
        assert_eq!(n.status, NodeStatus::Waiting);
        assert_eq!(n.pg_status, PgStatus::Up);
    }
    assert_eq!(o.snap.nodes[1].role, Role::Standby);
    assert_eq!(weights(&o), vec![1.0, 1.0, 1.0]);
    o.backend_connected(NodeId::new(0));
    assert_eq!(o.snap.nodes[0].status, NodeStatus::Up);
    assert_eq!(o.health_stats()[0].success_count, 1);
}

#[test]
fn failed_attempts_are_not_a_verdict_only_a_failed_round_is() {
    let mut o = started();
    o.attempt_failed(NodeId::new(1), "connection refused");
    assert_eq!(o.snap.nodes[1].pg_status, PgStatus::Down);
    assert_eq!(o.snap.nodes[1].status, NodeStatus::Waiting);
    assert_eq!(weights(&o), vec![1.0, 1.0, 1.0]);
    // The retry succeeds: nothing happened.
    o.round_finished(NodeId::new(1), ok(true), SystemTime::now(), adm(3));
    assert_eq!(o.snap.nodes[1].status, NodeStatus::Waiting);
    assert_eq!(o.snap.nodes[1].last_error, None);
    // Every retry fails: down.
    o.round_finished(NodeId::new(1), failed(), SystemTime::now(), adm(3));
    assert_eq!(o.snap.nodes[1].status, NodeStatus::Down);
    assert_eq!(weights(&o), vec![1.0, 0.0, 1.0]);
    assert_eq!(o.health_stats()[1].fail_count, 1);
    assert_eq!(o.health_stats()[1].retry_count, 2);
    // A failed primary leaves no primary.
    o.round_finished(NodeId::new(0), failed(), SystemTime::now(), adm(3));
    assert_eq!(o.snap.primary, None);
    assert!(!o.snap.has_primary());
}

#[test]
fn returning_standby_needs_streaming_evidence_newer_than_its_recovery() {
    let mut o = started();
    o.round_finished(NodeId::new(2), failed(), SystemTime::now(), adm(3));
    o.round_finished(NodeId::new(2), ok(true), SystemTime::now(), adm(3));
    assert_eq!(o.snap.nodes[2].status, NodeStatus::Down);
    assert!(o.snap.nodes[2].held_out.is_some());
    assert_eq!(o.snap.nodes[2].effective_weight, 0.0);
    // The primary does not show it yet.
    let r = round(
        Instant::now(),
        vec![
            NodeCheck::Sample(primary_sample(100, &[("node1", "streaming")])),
            NodeCheck::Sample(standby_sample(100)),
            NodeCheck::Sample(standby_sample(90)),
        ],
    );
    o.apply_replication(&r, adm(3), SystemTime::now());
    assert_eq!(o.snap.nodes[2].status, NodeStatus::Down);
    // Now it streams: admitted.
    let r = round(
        Instant::now(),
        vec![
            NodeCheck::Sample(primary_sample(
                100,
                &[("node1", "streaming"), ("node2", "streaming")],
            )),
            NodeCheck::Sample(standby_sample(100)),
            NodeCheck::Sample(standby_sample(100)),
        ],
    );
    o.apply_replication(&r, adm(3), SystemTime::now());
    assert_eq!(o.snap.nodes[2].status, NodeStatus::Waiting);
    assert_eq!(o.snap.nodes[2].held_out, None);
    assert_eq!(o.snap.nodes[2].repl.state, "streaming");
    assert_eq!(o.snap.nodes[2].repl.sync_state, "async");
    assert!(o.snap.nodes[2].effective_weight > 0.99);
}

#[test]
fn auto_failback_off_keeps_a_returning_standby_down_and_sr_off_admits_at_once() {
    let mut off = adm(3);
    off.auto_failback = false;
    let mut o = started();
    o.round_finished(NodeId::new(1), failed(), SystemTime::now(), off.clone());
    o.round_finished(NodeId::new(1), ok(true), SystemTime::now(), off.clone());
    assert_eq!(o.snap.nodes[1].status, NodeStatus::Down);
    assert!(
        o.snap.nodes[1]
            .held_out
            .as_deref()
            .unwrap()
            .contains("auto_failback")
    );

    let mut no_sr = adm(3);
    no_sr.sr_enabled = false;
    let mut o = started();
    o.round_finished(NodeId::new(1), failed(), SystemTime::now(), no_sr.clone());
    o.round_finished(NodeId::new(1), ok(true), SystemTime::now(), no_sr);
    assert_eq!(o.snap.nodes[1].status, NodeStatus::Waiting);
}

#[test]
fn a_second_primary_is_never_admitted() {
    let mut o = started();
    // Standby 2 is promoted behind pgpilot's back.
    o.round_finished(NodeId::new(2), ok(false), SystemTime::now(), adm(3));
    assert_eq!(o.snap.primary, Some(NodeId::new(0)));
    assert_eq!(o.snap.nodes[2].status, NodeStatus::Down);
    assert!(
        o.snap.nodes[2]
            .held_out
            .as_deref()
            .unwrap()
            .contains("false primary")
    );
    assert_eq!(o.snap.nodes[2].effective_weight, 0.0);
    // Even when the real primary goes away, the false one stays out.
    o.round_finished(NodeId::new(0), failed(), SystemTime::now(), adm(3));
    o.round_finished(NodeId::new(2), ok(false), SystemTime::now(), adm(3));
    assert_eq!(o.snap.primary, None);
    assert_eq!(o.snap.nodes[2].status, NodeStatus::Down);
    // The old primary comes back: it is the primary again.
    o.round_finished(NodeId::new(0), ok(false), SystemTime::now(), adm(3));
    assert_eq!(o.snap.primary, Some(NodeId::new(0)));
    assert_eq!(o.snap.nodes[0].status, NodeStatus::Waiting);
}

#[test]
fn promoted_standby_becomes_primary_only_when_the_failover_publishes_it() {
    let mut o = started();
    o.round_finished(NodeId::new(0), failed(), SystemTime::now(), adm(3));
    let t = o
        .transition_due(Duration::from_secs(1))
        .expect("a failover started");
    assert_eq!(
        (t.old_primary, t.phase),
        (Some(NodeId::new(0)), Phase::Detected)
    );
    assert!(o.in_transition());
    // A node claiming primary is not published behind the coordinator's back.
    o.round_finished(NodeId::new(1), ok(false), SystemTime::now(), adm(3));
    assert_eq!(o.snap.primary, None);
    o.promotion_started(t.id, NodeId::new(1)).unwrap();
    o.finish(t.id, NodeId::new(1), &adm(3)).unwrap();
    assert_eq!(o.snap.primary, Some(NodeId::new(1)));
    assert!(!o.in_transition());
    // The old primary returning as a primary is fenced: a false primary.
    o.round_finished(NodeId::new(0), ok(false), SystemTime::now(), adm(3));
    assert_eq!(o.snap.primary, Some(NodeId::new(1)));
    assert_eq!(o.snap.nodes[0].status, NodeStatus::Down);
    let why = o.snap.nodes[0].held_out.clone().unwrap();
    assert!(
        why.starts_with("false primary") && why.contains("ATTACH NODE 0"),
        "{why}"
    );
    assert_eq!(o.report().counts.get(Event::Fenced), 1);
}

#[test]
fn lag_lowers_weights_and_thresholds_cut_them() {
    let mut o = started();
    let t0 = Instant::now();
    let r = round(
        t0,
        vec![
            NodeCheck::Sample(primary_sample(
                10 << 20,
                &[("node1", "streaming"), ("node2", "streaming")],
            )),
            NodeCheck::Sample(standby_sample(10 << 20)),
            NodeCheck::Sample(standby_sample(5 << 20)),
        ],
    );
    o.apply_replication(&r, adm(3), SystemTime::now());
    let n1 = &o.snap.nodes[1].repl;
    assert_eq!((n1.lag_bytes, n1.lag_seconds), (Some(0), Some(0.0)));
    assert_eq!(o.snap.nodes[2].repl.lag_bytes, Some(5 << 20));
    assert_eq!(weights(&o), vec![1.0, 1.0, 0.0]);
    assert_eq!(o.snap.nodes[0].repl.lag_bytes, Some(0));
    // Caught up again: weight returns.
    let r = round(
        t0 + Duration::from_secs(1),
        vec![
            NodeCheck::Sample(primary_sample(11 << 20, &[])),
            NodeCheck::Sample(standby_sample(11 << 20)),
            NodeCheck::Sample(standby_sample((11 << 20) - 1000)),
        ],
    );
    o.apply_replication(&r, adm(3), SystemTime::now());
    let w = weights(&o);
    assert!(w[2] > 0.99 && w[2] < 1.0, "{w:?}");
}

#[test]
fn time_lag_grows_while_a_standby_is_stuck() {
    let mut o = started();
    let t0 = Instant::now();
    let checks = |p: u64, s: u64| {
        vec![
            NodeCheck::Sample(primary_sample(
                p,
                &[("node1", "streaming"), ("node2", "streaming")],
            )),
            NodeCheck::Sample(standby_sample(p)),
            NodeCheck::Sample(standby_sample(s)),
        ]
    };
    o.apply_replication(&round(t0, checks(100, 100)), adm(3), SystemTime::now());
    o.apply_replication(
        &round(t0 + Duration::from_secs(2), checks(200, 100)),
        adm(3),
        SystemTime::now(),
    );
    assert_eq!(o.snap.nodes[2].repl.lag_seconds, Some(0.0));
    o.apply_replication(
        &round(t0 + Duration::from_secs(5), checks(300, 100)),
        adm(3),
        SystemTime::now(),
    );
    let s = o.snap.nodes[2].repl.lag_seconds.unwrap();
    assert!((s - 3.0).abs() < 1e-6, "{s}");
    // Time lag of 3 s with half weight 1 s: f = 1 / (1 + 9).
    assert!((o.snap.nodes[2].effective_weight - 0.1).abs() < 1e-3);
    o.apply_replication(
        &round(t0 + Duration::from_secs(14), checks(400, 100)),
        adm(3),
        SystemTime::now(),
    );
    assert_eq!(
        o.snap.nodes[2].effective_weight, 0.0,
        "over delay_threshold_by_time"
    );
}

#[test]
fn timeline_and_role_mismatches_are_recorded() {
    let mut o = started();
    let mut diverged = standby_sample(100);
    diverged.timeline = Some(2);
    let r = round(
        Instant::now(),
        vec![
            NodeCheck::Sample(primary_sample(
                100,
                &[("node1", "streaming"), ("node2", "streaming")],
            )),
            NodeCheck::Sample(primary_sample(100, &[])),
            NodeCheck::Sample(diverged),
        ],
    );
    let recheck = o.apply_replication(&r, adm(3), SystemTime::now());
    assert_eq!(recheck, vec![NodeId::new(1)]);
    assert!(
        o.snap.nodes[1]
            .repl
            .issue
            .as_deref()
            .unwrap()
            .contains("role mismatch")
    );
    assert!(o.snap.nodes[2].repl.timeline_mismatch);
    assert!(
        o.snap.nodes[2]
            .repl
            .issue
            .as_deref()
            .unwrap()
            .contains("timeline")
    );
    assert_eq!(o.snap.nodes[2].effective_weight, 0.0);
    // A failed or skipped check: lag unknown, weight as configured.
    let r = round(
        Instant::now(),
        vec![
            NodeCheck::Sample(primary_sample(100, &[("node1", "streaming")])),
            NodeCheck::Failed("timeout".into()),
            NodeCheck::Skipped,
        ],
    );
    o.apply_replication(&r, adm(3), SystemTime::now());
    assert_eq!(o.snap.nodes[1].repl.lag_bytes, None);
    assert_eq!(o.snap.nodes[1].effective_weight, 1.0);
    assert!(
        o.snap.nodes[2]
            .repl
            .issue
            .as_deref()
            .unwrap()
            .contains("unreachable")
    );
}

#[test]
fn application_name_is_detected_when_not_configured() {
    let mut a = adm(3);
    a.nodes[1].application_name.clear();
    let mut o = started();
    let mut s = standby_sample(100);
    s.receiver_application_name = Some("node1".into());
    let r = round(
        Instant::now(),
        vec![
            NodeCheck::Sample(primary_sample(100, &[("node1", "catchup")])),
            NodeCheck::Sample(s),
            NodeCheck::Skipped,
        ],
    );
    o.apply_replication(&r, a, SystemTime::now());
    assert_eq!(o.snap.nodes[1].repl.application_name, "node1");
    assert_eq!(o.snap.nodes[1].repl.state, "catchup");
}

#[test]
fn history_finds_when_the_primary_passed_an_lsn() {
    let mut h = LsnHistory::default();
    let t = Instant::now();
    h.push(NodeId::new(0), t, 10);
    h.push(NodeId::new(0), t + Duration::from_secs(1), 10);
    h.push(NodeId::new(0), t + Duration::from_secs(2), 20);
    assert_eq!(h.behind_since(5), Some(t));
    assert_eq!(h.behind_since(10), Some(t + Duration::from_secs(2)));
    assert_eq!(h.behind_since(20), None);
    // A new primary starts a new history.
    h.push(NodeId::new(1), t + Duration::from_secs(3), 5);
    assert_eq!(h.samples.len(), 1);
}

#[test]
fn a_primary_that_answers_with_errors_is_not_failed_over() {
    let mut o = started();
    let mut r = failed();
    r.outcome = Err(probe_error(
        "FATAL 53300: sorry, too many clients already",
        true,
    ));
    o.round_finished(NodeId::new(0), r, SystemTime::now(), adm(3));
    assert_eq!(o.snap.primary, None);
    assert!(!o.in_transition());
    assert!(o.report().blocked.unwrap().contains("not failed over"));
    // Back to normal: it is the primary again, nothing was promoted.
    o.round_finished(NodeId::new(0), ok(false), SystemTime::now(), adm(3));
    assert_eq!(o.snap.primary, Some(NodeId::new(0)));
    assert!(o.report().blocked.is_none());
}

#[test]
fn the_old_primary_back_before_promotion_cancels_the_failover() {
    let mut o = started();
    o.primary_unreachable(NodeId::new(0), "connection refused".into(), &adm(3));
    let t = o.transition_due(Duration::from_secs(1)).unwrap();
    o.set_phase(t.id, Phase::Waiting, "refused: lag".into())
        .unwrap();
    o.round_finished(NodeId::new(0), ok(false), SystemTime::now(), adm(3));
    assert_eq!(o.snap.primary, Some(NodeId::new(0)));
    assert!(!o.in_transition());
    let last = o.report().last.unwrap();
    assert_eq!(last.phase, Phase::Failed);
    assert!(last.detail.contains("cancelled"));
    // A step of the cancelled failover changes nothing.
    let gone = Err(StepError::Superseded { id: t.id });
    assert_eq!(o.promotion_started(t.id, NodeId::new(1)), gone);
    assert_eq!(o.finish(t.id, NodeId::new(1), &adm(3)), gone);
    assert_eq!(o.snap.primary, Some(NodeId::new(0)));
    assert!(o.books[0].hold.is_none());
}

#[test]
fn a_forced_candidate_is_tried_at_once_then_waits_like_any_attempt() {
    let retry = Duration::from_secs(1);
    let mut o = started();
    o.primary_unreachable(NodeId::new(0), "connection refused".into(), &adm(3));
    let t = o.transition_due(retry).unwrap();
    o.candidate_refused(t.id, None, "refused: lag".into())
        .unwrap();
    assert!(o.transition_due(retry).is_none());
    // PROMOTE NODE 1: due at once.
    o.force_candidate(NodeId::new(1)).unwrap();
    let t = o.transition_due(retry).unwrap();
    assert_eq!(t.forced, Some(NodeId::new(1)));
    // Node 1 refuses: the next attempt waits the retry time (no busy loop),
    // still for node 1.
    o.candidate_refused(t.id, Some(NodeId::new(1)), "connection refused".into())
        .unwrap();
    assert!(o.transition_due(retry).is_none());
    assert_eq!(o.report().current.unwrap().forced, Some(NodeId::new(1)));
    assert!(o.transition_due(Duration::ZERO).is_some());
    // Forced again while an attempt for node 1 runs: node 2 is due at once.
    o.force_candidate(NodeId::new(2)).unwrap();
    o.candidate_refused(t.id, Some(NodeId::new(1)), "connection refused".into())
        .unwrap();
    assert_eq!(
        o.transition_due(retry).unwrap().forced,
        Some(NodeId::new(2))
    );
}

#[test]
fn an_old_primary_that_answers_at_the_last_look_cancels_the_failover() {
    let mut o = started();
    o.primary_unreachable(NodeId::new(0), "connection refused".into(), &adm(3));
    let t = o.transition_due(Duration::from_secs(1)).unwrap();
    o.primary_answers(
        t.id,
        NodeId::new(0),
        "FATAL 53300: sorry, too many clients already".into(),
        &adm(3),
    )
    .unwrap();
    // Cancelled, and no new failover starts: it is a running primary.
    assert!(!o.in_transition());
    let last = o.report().last.unwrap();
    assert_eq!(last.phase, Phase::Failed);
    assert!(last.detail.contains("cancelled"), "{}", last.detail);
    assert!(o.report().blocked.unwrap().contains("not failed over"));
    assert_eq!(
        o.promotion_started(t.id, NodeId::new(1)),
        Err(StepError::Superseded { id: t.id })
    );
    // Answers normally again: the primary, nothing was promoted.
    o.round_finished(NodeId::new(0), ok(false), SystemTime::now(), adm(3));
    assert_eq!(o.snap.primary, Some(NodeId::new(0)));
    // Unreachable later: failed over after all.
    o.round_finished(NodeId::new(0), failed(), SystemTime::now(), adm(3));
    assert!(o.in_transition());
}

#[test]
fn after_promotion_the_old_primary_cannot_come_back_by_itself() {
    let mut o = started();
    o.primary_unreachable(NodeId::new(0), "connection refused".into(), &adm(3));
    let t = o.transition_due(Duration::from_secs(1)).unwrap();
    o.promotion_started(t.id, NodeId::new(1)).unwrap();
    // It answers again while the search runs: fenced, never published.
    o.round_finished(NodeId::new(0), ok(false), SystemTime::now(), adm(3));
    assert_eq!(o.snap.primary, None);
    assert_eq!(o.snap.nodes[0].status, NodeStatus::Down);
    o.finish(t.id, NodeId::new(1), &adm(3)).unwrap();
    assert_eq!(o.snap.primary, Some(NodeId::new(1)));
    // Rebuilt as a standby: still held until an operator attaches it.
    o.round_finished(NodeId::new(0), ok(true), SystemTime::now(), adm(3));
    assert_eq!(o.snap.nodes[0].status, NodeStatus::Down);
    let e = o.finish(t.id, NodeId::new(0), &adm(3)).unwrap_err();
    assert_eq!(
        e,
        StepError::Held {
            node: NodeId::new(0)
        }
    );
    let msg = o.attach(NodeId::new(0), &adm(3)).unwrap();
    assert!(msg.contains("in service"), "{msg}");
    assert!(o.snap.nodes[0].status.is_usable());
    assert_eq!(o.snap.primary, Some(NodeId::new(1)));
}

#[test]
fn attach_refuses_a_second_primary_and_detach_refuses_the_primary() {
    let mut o = started();
    o.round_finished(NodeId::new(2), ok(false), SystemTime::now(), adm(3));
    let e = o.attach(NodeId::new(2), &adm(3)).unwrap_err();
    assert_eq!(
        e,
        CommandError::SecondPrimary {
            node: NodeId::new(2),
            primary: NodeId::new(0)
        }
    );
    assert!(e.to_string().contains("rebuild it as a standby"), "{e}");
    let e = o.detach(NodeId::new(0), &adm(3)).unwrap_err();
    assert_eq!(
        e,
        CommandError::DetachPrimary {
            node: NodeId::new(0)
        }
    );
    assert!(e.to_string().contains("PROMOTE NODE"), "{e}");
    // Detach a standby: no traffic, reason shown; attach brings it back.
    let mut o = started();
    o.detach(NodeId::new(1), &adm(3)).unwrap();
    assert_eq!(o.snap.nodes[1].status, NodeStatus::Down);
    assert_eq!(o.snap.nodes[1].effective_weight, 0.0);
    assert!(
        o.snap.nodes[1]
            .held_out
            .as_deref()
            .unwrap()
            .contains("detached")
    );
    o.round_finished(NodeId::new(1), ok(true), SystemTime::now(), adm(3));
    assert_eq!(o.snap.nodes[1].status, NodeStatus::Down, "stays detached");
    o.attach(NodeId::new(1), &adm(3)).unwrap();
    assert_eq!(o.snap.nodes[1].status, NodeStatus::Waiting);
    let c = o.report().counts;
    assert_eq!((c.get(Event::Detach), c.get(Event::Attach)), (1, 1));
}

#[test]
fn stale_health_rounds_do_not_undo_a_role_seen_directly() {
    let mut o = started();
    o.primary_unreachable(NodeId::new(0), "refused".into(), &adm(3));
    let t = o.transition_due(Duration::from_secs(1)).unwrap();
    let mut stale = ok(true);
    stale.started = Instant::now();
    o.promotion_started(t.id, NodeId::new(1)).unwrap();
    o.observe_role(NodeId::new(1), false);
    o.finish(t.id, NodeId::new(1), &adm(3)).unwrap();
    // A round that started before the promotion was seen reports "standby".
    o.round_finished(NodeId::new(1), stale, SystemTime::now(), adm(3));
    assert_eq!(o.snap.primary, Some(NodeId::new(1)));
    assert_eq!(o.snap.nodes[1].role, Role::Primary);
    assert!(!o.in_transition());
}

#[test]
fn a_switchover_holds_writes_and_an_abort_restores_the_primary() {
    let mut o = started();
    let (id, old) = o.begin_switchover(NodeId::new(1), &adm(3)).unwrap();
    assert_eq!(old, NodeId::new(0));
    assert_eq!(o.snap.primary, None);
    assert_eq!(
        o.begin_switchover(NodeId::new(2), &adm(3)),
        Err(CommandError::Busy {
            kind: TransitionKind::Switchover
        })
    );
    // A switchover is not a failover the coordinator picks up.
    assert!(o.transition_due(Duration::ZERO).is_none());
    o.fail(id, "target did not catch up".into(), &adm(3))
        .unwrap();
    assert_eq!(o.snap.primary, Some(NodeId::new(0)));
    assert_eq!(o.report().counts.get(Event::SwitchoverFailed), 1);
}

#[test]
fn a_standby_that_cannot_follow_is_held_until_it_streams() {
    let mut o = started();
    o.cannot_follow(NodeId::new(2), "cannot follow node 0: diverged".into());
    assert_eq!(o.snap.nodes[2].status, NodeStatus::Down);
    o.round_finished(NodeId::new(2), ok(true), SystemTime::now(), adm(3));
    assert_eq!(o.snap.nodes[2].status, NodeStatus::Down);
    let t = Instant::now() + Duration::from_millis(5);
    let r = round(
        t,
        vec![
            NodeCheck::Sample(primary_sample(
                100,
                &[("node1", "streaming"), ("node2", "streaming")],
            )),
            NodeCheck::Sample(standby_sample(100)),
            NodeCheck::Sample(standby_sample(100)),
        ],
    );
    o.apply_replication(&r, adm(3), SystemTime::now());
    assert!(
        o.snap.nodes[2].status.is_usable(),
        "{:?}",
        o.snap.nodes[2].held_out
    );
}

// ---- coordination: a follower applies what etcd recorded (shared.rs) ----

fn external(primary: Option<usize>, timeline: Option<u32>) -> External {
    External {
        primary: primary.map(NodeId::new),
        timeline,
        failover: false,
    }
}

#[test]
fn a_follower_starts_no_failover_and_publishes_only_the_recorded_primary() {
    let mut o = started();
    let holds = o.holds_with_reasons();
    o.apply_external(external(Some(0), None), holds.clone(), &adm(3));
    assert_eq!(o.snap.primary, Some(NodeId::new(0)));
    // The primary fails: no failover of its own, no primary.
    o.round_finished(NodeId::new(0), failed(), SystemTime::now(), adm(3));
    assert_eq!(o.snap.primary, None);
    assert!(!o.in_transition());
    // Node 1 claims primary (promoted by the leader): not routed to until
    // etcd says so.
    o.round_finished(NodeId::new(1), ok(false), SystemTime::now(), adm(3));
    assert_eq!(o.snap.primary, None);
    o.apply_external(external(Some(1), None), holds, &adm(3));
    assert_eq!(o.snap.primary, Some(NodeId::new(1)));
}

#[test]
fn a_follower_never_routes_to_a_node_on_an_older_timeline_than_recorded() {
    let mut o = started();
    let holds = o.holds_with_reasons();
    o.snap.nodes[0].repl.timeline = Some(1);
    o.apply_external(external(Some(0), Some(2)), holds.clone(), &adm(3));
    assert_eq!(o.snap.primary, None);
    o.snap.nodes[0].repl.timeline = Some(2);
    o.apply_external(external(Some(0), Some(2)), holds, &adm(3));
    assert_eq!(o.snap.primary, Some(NodeId::new(0)));
}

#[test]
fn recorded_holds_apply_and_the_leader_decides_again_after_release() {
    let mut o = started();
    let mut holds = o.holds_with_reasons();
    holds[2] = Some(Hold {
        kind: HoldKind::Detached,
        reason: "detached by operator".into(),
    });
    o.apply_external(external(Some(0), None), holds, &adm(3));
    assert!(!o.snap.nodes[2].status.is_usable());
    assert_eq!(o.holds()[2], Some(HoldKind::Detached));
    // Becoming the leader: losing the primary starts a failover again.
    o.release_external(&adm(3));
    o.round_finished(NodeId::new(0), failed(), SystemTime::now(), adm(3));
    assert!(o.in_transition());
}
