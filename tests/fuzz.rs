//! The fuzz targets (`pgpilot::fuzzing`) in CI: each runs over its seed
//! corpus (the inputs below, and the files under `fuzz/corpus/<target>/`
//! when present), then over random mutations of the seeds, for
//! `PGPILOT_FUZZ_ITERS` inputs per target (default 3000; seconds in all).
//! `PGPILOT_FUZZ_SEED` picks another random sequence. A failing input is
//! printed (as hex) before the panic is passed on, to be replayed with
//! `cargo fuzz run <target> <file>` or added to the seeds.
//!
//! For hours of coverage-guided fuzzing, see `docs/fuzzing.md`.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::Path;
use std::time::{Duration, Instant};

use pgpilot::fuzzing::TARGETS;

/// A frontend message: tag, length, body.
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Hand-written inputs per target: valid messages and the edges of each
/// length and field check.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let cat = |parts: &[&[u8]]| parts.concat();
    match target {
        "frame" => vec![
            cat(&[&[0], &msg(b'Q', b"SELECT 1\0")]),
            cat(&[
                &[7],
                &msg(b'P', b"s1\0SELECT $1\0\0\0"),
                &msg(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x011\0\0"),
                &msg(b'S', b""),
            ]),
            cat(&[
                &[255],
                &msg(b'Z', b"I"),
                &msg(b'E', b"SFATAL\0C57P01\0Mbye\0\0"),
            ]),
            cat(&[
                &[3],
                &msg(b'S', b"client_encoding\0UTF8\0"),
                &msg(b'D', &[0; 40]),
            ]),
            cat(&[&[1], &[b'Q', 0x7f, 0xff, 0xff, 0xff]]),
            cat(&[&[1], &[b'Q', 0, 0, 0, 3]]),
            cat(&[&[1], &[b'Q', 0x80, 0, 0, 0]]),
            cat(&[&[2], &[b'T', 0, 0, 0x40, 0], &[0; 64]]),
            cat(&[&[9], &msg(b't', b"\0\x01\0\0\0\x17"), &msg(b'T', b"\0\0")]),
        ],
        "startup" => vec![
            cat(&[&196608i32.to_be_bytes(), b"user\0app\0database\0db\0\0"]),
            cat(&[&196610i32.to_be_bytes(), b"user\0a\0_pq_.x\0y\0\0"]),
            80877103i32.to_be_bytes().to_vec(),
            80877104i32.to_be_bytes().to_vec(),
            cat(&[&80877102i32.to_be_bytes(), &[0, 0, 0, 7, 0, 0, 0, 9]]),
            cat(&[&(2i32 << 16).to_be_bytes()]),
            cat(&[&196608i32.to_be_bytes(), b"user\0\xff\xfe\0\0"]),
            cat(&[&196608i32.to_be_bytes(), b"user"]),
        ],
        "sasl" => vec![
            b"SCRAM-SHA-256\0\0\0\0\x13n,,n=,r=abcdefghij\xffc=biws,r=@N,p=AAAA".to_vec(),
            b"n,,n=user,r=abc\xffc=biws,r=@N,p=dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3Q="
                .to_vec(),
            b"y,,n=,r=x\xffc=eSws,r=@N,p=".to_vec(),
            b"p=tls-server-end-point,,n=,r=x\xff".to_vec(),
            b"n,a=admin,n=,r=\xffc=biws,p=".to_vec(),
            b"r=abc,s=c2FsdA==,i=4096\xffv=c2ln".to_vec(),
            b"md5abcdef0123456789abcdef0123456789\0".to_vec(),
            b"SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB".to_vec(),
        ],
        "hba" => vec![
            b"host all all 127.0.0.1/32 trust\n".to_vec(),
            b"hostssl app,postgres app 10.0.0.0/8 scram-sha-256\nhostnossl all all ::1/128 md5\n"
                .to_vec(),
            b"host all all 192.168.0.0 255.255.0.0 password\n# comment\n\nhost all all all reject\n"
                .to_vec(),
            b"host \"all\" \"a b\" 0.0.0.0/0 cert\n".to_vec(),
            b"host all all ::ffff:10.0.0.0/104 md5\nhost all all 0.0.0.0/33 md5\n".to_vec(),
            b"host all all 1.2.3.4/32 md5 \\\n\n".to_vec(),
            b"local all all peer\nhost all +g all md5\nhost all @f all md5\n".to_vec(),
        ],
        "classify" => vec![
            b"SELECT 1".to_vec(),
            // Found by this target: shared the cache key of `SELECT 1`.
            b"SELECT 1_".to_vec(),
            b"SELECT 1_000, 0x_1, 1__0".to_vec(),
            // Found by this target: `1 ?` (an operator) and `1 ''` (a literal)
            // shared a key.
            b"SELECT 1''''''".to_vec(),
            b"SELECT 1?".to_vec(),
            b"SELECT 1 1".to_vec(),
            // Found by this target: sqlparser read the comment glued to an
            // operator as more operator (and `SELECT 'x' ~~` as a read).
            b"SELECT 'x' ~~-- a".to_vec(),
            b"SELECT 'x' ~~".to_vec(),
            b"SELECT 2 ~~--'\n 3, nextval($$s$$) --'".to_vec(),
            // Found by this target: a comment that never closes was dropped
            // from the key (`SELECT 1_000, 0xaa` and the same with `/* /* */`).
            b"SELECT 1_000, 0xaaaaaa".to_vec(),
            b"SELECT 1_000, 0xaaaaaa/* /* */".to_vec(),
            // Found by this target: `0o2r` (junk after an octal number) was
            // one number.
            b"select 0o2 u".to_vec(),
            b"select  0o2r u\x0c\x0c".to_vec(),
            // Found by this target: a `--` comment ran past a carriage
            // return, where PostgreSQL ends it.
            b"SELECT 1; -- c\rDELETE FROM t".to_vec(),
            b"SELECT '{}'::jsonb ? 'a', x ?| y".to_vec(),
            b"select * from t where id = $1 for update".to_vec(),
            b"WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x".to_vec(),
            b"/* pgpilot:standby */ SELECT nextval('s'); insert into t values (1)".to_vec(),
            b"BEGIN; SET LOCAL x = 1; COMMIT".to_vec(),
            b"SELECT $$a;b$$, E'\\'', \"q\"\"\" FROM t -- c\n; DROP TABLE t".to_vec(),
            b"EXPLAIN ANALYZE UPDATE t SET a = 1".to_vec(),
            b"COPY t TO STDOUT; LISTEN x; SELECT pg_advisory_lock(1)".to_vec(),
            b"CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1; END".to_vec(),
            b"SELECT ((((((((((((((((((((((((((((((((1))))))))))))))))))))))))))))))))".to_vec(),
            vec![0xc3, 0x28],
        ],
        other => panic!("no seeds for {other}"),
    }
}

/// The corpus files `cargo fuzz` keeps for `target`, if any.
fn corpus_files(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .filter(|b| b.len() <= 64 << 10)
        .collect()
}

/// Byte values that sit on the edges of length and field checks.
const INTERESTING: &[u8] = &[
    0, 1, 3, 4, 5, 0x7f, 0x80, 0xfe, 0xff, b',', b'=', b'$', b';', b'\'',
];

/// One random mutation of `input` (in place), libFuzzer's usual kinds:
/// flips, interesting bytes, inserted/removed/duplicated runs, big-endian
/// lengths overwritten, splices with another seed.
fn mutate(rng: &mut fastrand::Rng, input: &mut Vec<u8>, other: &[u8]) {
    let len = input.len();
    match rng.u8(..8) {
        0 if len > 0 => input[rng.usize(..len)] ^= 1 << rng.u8(..8),
        1 if len > 0 => input[rng.usize(..len)] = INTERESTING[rng.usize(..INTERESTING.len())],
        2 => {
            let at = rng.usize(..=len);
            let n = rng.usize(1..=8);
            let b = INTERESTING[rng.usize(..INTERESTING.len())];
            input.splice(at..at, std::iter::repeat_n(b, n));
        }
        3 if len > 0 => {
            let at = rng.usize(..len);
            let n = rng.usize(1..=(len - at).min(16));
            input.drain(at..at + n);
        }
        4 if len > 0 => {
            let at = rng.usize(..len);
            let n = rng.usize(1..=(len - at).min(32));
            let run = input[at..at + n].to_vec();
            let to = rng.usize(..=len);
            input.splice(to..to, run);
        }
        5 if len >= 4 => {
            let at = rng.usize(..=len - 4);
            let v: i32 = [
                0,
                3,
                4,
                5,
                -1,
                i32::MAX,
                i32::MIN,
                len as i32,
                1 << 20,
                10_000,
            ][rng.usize(..10)];
            input[at..at + 4].copy_from_slice(&v.to_be_bytes());
        }
        6 if !other.is_empty() => {
            let cut = rng.usize(..=len);
            let from = rng.usize(..other.len());
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
        _ => input.push(rng.u8(..)),
    }
    input.truncate(64 << 10);
}

/// Run `f` on `input`; on a panic print the input before passing it on.
fn run(name: &str, f: fn(&[u8]), input: &[u8]) {
    let started = Instant::now();
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(input))) {
        let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
        eprintln!("fuzz target {name} failed on input (hex): {hex}");
        resume_unwind(p);
    }
    // Nothing here is allowed to take long: a slow input is a hang in waiting.
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "{name} took {took:?} on {} bytes: {:?}",
        input.len(),
        String::from_utf8_lossy(input)
    );
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fuzz(name: &str) {
    let f = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .expect("a target");
    let mut corpus = seeds(name);
    corpus.extend(corpus_files(name));
    for input in &corpus {
        run(name, f, input);
    }
    let iterations = env_u64("PGPILOT_FUZZ_ITERS", 3000);
    let mut rng = fastrand::Rng::with_seed(env_u64("PGPILOT_FUZZ_SEED", 0x5eed));
    for _ in 0..iterations {
        let mut input = corpus[rng.usize(..corpus.len())].clone();
        let other = &corpus[rng.usize(..corpus.len())];
        for _ in 0..rng.usize(1..=4) {
            mutate(&mut rng, &mut input, other);
        }
        run(name, f, &input);
    }
}

#[test]
fn every_target_has_a_test() {
    let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["frame", "startup", "sasl", "hba", "classify"]);
}

#[test]
fn frame() {
    fuzz("frame");
}

#[test]
fn startup() {
    fuzz("startup");
}

#[test]
fn sasl() {
    fuzz("sasl");
}

#[test]
fn hba() {
    fuzz("hba");
}

#[test]
fn classify() {
    fuzz("classify");
}

/// Write the seeds as `cargo fuzz`'s starting corpus (`fuzz/corpus/<target>/`).
#[test]
#[ignore = "writes files: run by hand before a long cargo fuzz run"]
fn write_seed_corpus() {
    for (name, _) in TARGETS {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds(name).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
        }
    }
}
