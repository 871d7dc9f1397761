//! Unit tests of the metrics registry: hot-path counters and scraping.

use super::*;

#[test]
fn hot_path_counters_feed_admin_counts() {
    let m = Metrics::new(2);
    m.statement_routed(NodeId::new(1), "read");
    m.statement_routed(NodeId::new(1), "read");
    m.statement_routed(NodeId::new(0), "write");
    m.statement_routed(NodeId::new(7), "read"); // unknown node: ignored
    m.statement_routed(NodeId::new(0), "bogus");
    assert_eq!(m.select_count(NodeId::new(1)), 2);
    assert_eq!(m.select_count(NodeId::new(0)), 0);
    m.command_completed(NodeId::new(0), b"INSERT 0 1");
    m.command_completed(NodeId::new(0), b"CREATE TABLE");
    m.command_completed(NodeId::new(0), b"SELECT 3");
    m.command_completed(NodeId::new(0), b"VACUUM");
    m.node_error(NodeId::new(0), ErrorSeverity::Fatal);
    let c = m.node_counts(NodeId::new(0));
    assert_eq!((c.insert, c.ddl, c.other, c.fatal), (1, 1, 1, 1));
    m.server_error(b"23505");
    m.server_error(b"\0\0\0\0\0");
    m.query_finished(NodeId::new(0), 0.002);
    m.health_checked(NodeId::new(1), Duration::from_millis(3), false);
    m.client_connected();
    let text = String::from_utf8({
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut out)
            .unwrap();
        out
    })
    .unwrap();
    for line in [
        "pgpilot_statements_routed_total{kind=\"read\",node=\"1\"} 2",
        "pgpilot_server_errors_total{class=\"23\"} 1",
        "pgpilot_server_errors_total{class=\"XX\"} 1",
        "pgpilot_client_connections 1",
        "pgpilot_health_check_failures_total{node=\"1\"} 1",
        "pgpilot_query_duration_seconds_count{node=\"0\"} 1",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}

#[test]
fn every_metric_registers() {
    // A duplicate or malformed name would be logged and dropped; count them.
    let m = Metrics::new(1);
    m.scrape.primary_available.set(1);
    m.scrape.node_up.with_label_values(&["0"]).set(1);
    let names: Vec<String> = m
        .registry
        .gather()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    assert!(names.iter().all(|n| n.starts_with("pgpilot_")), "{names:?}");
    assert!(names.contains(&"pgpilot_primary_available".to_string()));
    assert!(names.contains(&"pgpilot_node_up".to_string()));
}
