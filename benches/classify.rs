//! Classifier benchmarks: the cache hit path and cold parses.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use pgpilot::router::cache::ClassifyCache;
use pgpilot::router::classify::{Classifier, FunctionPolicy, SqlParserClassifier};
use pgpilot::router::normalize::normalize;
use pgpilot::router::normalize_fast::normalize_plain;

/// A ~100-character pgbench-like read.
fn pgbench(aid: u32) -> String {
    format!(
        "SELECT abalance FROM pgbench_accounts WHERE aid = {aid} AND bid = 1 ORDER BY aid LIMIT 10 /*x*/"
    )
}

/// A ~400-character join with a CTE.
const JOIN_CTE: &str = "WITH recent AS (SELECT o.customer_id, sum(o.amount) AS total, count(*) AS n \
     FROM orders o WHERE o.created_at > now() - interval '30 days' AND o.status IN ('paid', 'shipped') \
     GROUP BY o.customer_id HAVING count(*) > 2) \
     SELECT c.id, c.name, r.total, r.n, coalesce(a.city, 'unknown') AS city \
     FROM customers c JOIN recent r ON r.customer_id = c.id \
     LEFT JOIN addresses a ON a.customer_id = c.id AND a.is_primary \
     WHERE c.active AND lower(c.email) LIKE '%@example.com' ORDER BY r.total DESC LIMIT 50";

fn benches(c: &mut Criterion) {
    let classifier = SqlParserClassifier::new(FunctionPolicy::default());
    let statements: Vec<String> = (0..1024).map(|i| pgbench(48_213 + i * 7)).collect();

    let cache = ClassifyCache::new(10_000);
    cache.classify(statements[0].as_bytes(), || &classifier);
    let mut i = 0usize;
    c.bench_function("normalize+cache hit", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(cache.classify(black_box(statements[i].as_bytes()), || &classifier))
        })
    });

    // pgbench -S's statement exactly: no comment, one literal.
    let plain: Vec<String> = (0..1024)
        .map(|i| {
            format!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
                48_213 + i * 7
            )
        })
        .collect();
    cache.classify(plain[0].as_bytes(), || &classifier);
    c.bench_function("normalize+cache hit, pgbench -S", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(cache.classify(black_box(plain[i].as_bytes()), || &classifier))
        })
    });

    // The key alone: the general lexer against the plain-statement fast path.
    let mut key = String::with_capacity(512);
    c.bench_function("key, general lexer, pgbench -S", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            normalize(black_box(&plain[i]), &mut key);
            black_box(key.len())
        })
    });
    let mut key = Vec::with_capacity(512);
    c.bench_function("key, fast path, pgbench -S", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(normalize_plain(black_box(plain[i].as_bytes()), &mut key));
            black_box(key.len())
        })
    });

    c.bench_function("cold parse pgbench", |b| {
        b.iter(|| black_box(classifier.classify(black_box(&statements[0]))))
    });

    c.bench_function("cold parse join+cte", |b| {
        b.iter(|| black_box(classifier.classify(black_box(JOIN_CTE))))
    });
}

criterion_group!(classify, benches);
criterion_main!(classify);
