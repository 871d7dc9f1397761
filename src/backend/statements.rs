//! The named prepared statements a server connection holds, whoever made them.
//!
//! Under transaction pooling a connection moves between sessions with its
//! prepared statements still on the server. Each session keeps its own record
//! of the statements it prepared (the client's Parse frames); this table says
//! which statement the *server* holds under each name, so that a session
//!
//! * uses one as is when it is its own, or when it is the same Parse (same text,
//!   same parameter types) made by a session in the same clean context: both
//!   sessions share the pool key (node, user, database, startup parameters)
//!   and neither changed a setting, so the text means the same;
//! * closes it first when it is anything else, so the server never runs
//!   another session's statement in place of the one the client asked for.
//!
//! The table errs on the side of "may exist": an entry whose content is not
//! known is closed before its name is used. Its size is capped
//! (`pool.max_prepared_statements`): the least recently used are closed.

use std::collections::HashMap;

use bytes::Bytes;

use crate::protocol::shape::Shape;

/// One statement on the server.
#[derive(Debug, Clone)]
struct HeldStmt {
    /// The Parse frame that made it, or `None` when a statement may exist under
    /// this name but which one is not known (a Close or Parse whose outcome was
    /// not seen).
    made_by: Option<Bytes>,
    /// Made in a clean context (no setting changed in the session that made
    /// it): another clean session with an identical Parse may use it.
    shareable: bool,
    /// Value of the use counter when last made or used (least recently used
    /// statements are closed first).
    last_used: u64,
    /// Its shape, when a Describe of it was answered here.
    shape: Option<Shape>,
}

/// Named prepared statements on one server connection (the unnamed statement
/// is tracked apart, see [`super::conn::Unnamed`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct HeldStatements {
    /// Name → what the server holds under it.
    map: HashMap<Vec<u8>, HeldStmt>,
    /// Use counter (a logical clock for least-recently-used order).
    clock: u64,
}

impl HeldStatements {
    /// Number of names that may exist on the server.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no named statement may exist on the server.
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The names may still exist, but what they hold is no longer known (a
    /// reset query other than DISCARD ALL ran): each is closed before use.
    pub(crate) fn forget_contents(&mut self) {
        for h in self.map.values_mut() {
            h.made_by = None;
        }
    }

    /// Whether a statement may exist under `name`.
    pub(crate) fn contains(&self, name: &[u8]) -> bool {
        self.map.contains_key(name)
    }

    /// The server made `name` from `frame` (its ParseComplete came, or an
    /// exchange that parsed it succeeded), of `shape` if that exchange
    /// described it.
    pub(crate) fn made(
        &mut self,
        name: &[u8],
        frame: Bytes,
        shareable: bool,
        shape: Option<Shape>,
    ) {
        self.clock += 1;
        self.map.insert(
            name.to_vec(),
            HeldStmt {
                made_by: Some(frame),
                shareable,
                last_used: self.clock,
                shape,
            },
        );
    }

    /// A Describe of `name` answered here with `shape`.
    pub(crate) fn described(&mut self, name: &[u8], shape: Shape) {
        if let Some(h) = self.map.get_mut(name) {
            h.shape = Some(shape);
        }
    }

    /// Something under `name` may exist, content unknown: closed before use.
    pub(crate) fn unknown(&mut self, name: &[u8]) {
        self.clock += 1;
        let clock = self.clock;
        self.map
            .entry(name.to_vec())
            .and_modify(|h| {
                h.made_by = None;
                h.last_used = clock;
            })
            .or_insert(HeldStmt {
                made_by: None,
                shareable: false,
                last_used: clock,
                shape: None,
            });
    }

    /// The server no longer holds `name` (a Close of it succeeded).
    pub(crate) fn closed(&mut self, name: &[u8]) {
        self.map.remove(name);
    }

    /// The server holds no named statement (DISCARD ALL, DEALLOCATE ALL).
    pub(crate) fn clear(&mut self) {
        self.map.clear();
    }

    /// Whether the statement under `name` is the one `own` made: the same
    /// record (the session parsed it on this connection before giving the
    /// connection back), or, when `clean` (the asking session changed no
    /// setting) and it was made in a clean context, an identical Parse.
    /// When the session knows its statement's shape (`own_shape`, the client
    /// described it), the one here must be known to have it too, unless it
    /// is the session's own record without a known shape (the client parsed
    /// it here itself, and the server keeps its result fixed). Counts as a use.
    pub(crate) fn is(
        &mut self,
        name: &[u8],
        own: &Bytes,
        clean: bool,
        own_shape: Option<Shape>,
    ) -> bool {
        self.clock += 1;
        let clock = self.clock;
        let Some(h) = self.map.get_mut(name) else {
            return false;
        };
        let Some(made_by) = &h.made_by else {
            return false;
        };
        let same_record = made_by.as_ptr() == own.as_ptr() && made_by.len() == own.len();
        let same = same_record || (clean && h.shareable && made_by == own);
        let same = same
            && match (own_shape, h.shape) {
                (None, _) => true,
                (Some(a), Some(b)) => a == b,
                (Some(_), None) => same_record,
            };
        if same {
            h.last_used = clock;
        }
        same
    }

    /// Names to close to get back to `cap` entries, least recently used first,
    /// never one of `keep`.
    pub(crate) fn excess(&self, cap: usize, keep: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let over = self.map.len().saturating_sub(cap);
        if over == 0 {
            return Vec::new();
        }
        let mut by_age: Vec<(&Vec<u8>, u64)> = self
            .map
            .iter()
            .filter(|(n, _)| !keep.contains(n))
            .map(|(n, h)| (n, h.last_used))
            .collect();
        by_age.sort_unstable_by_key(|(_, t)| *t);
        by_age
            .into_iter()
            .take(over)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Names that may exist here other than `own` (statements of other
    /// sessions, or unknown ones).
    pub(crate) fn others(&self, own: &std::collections::HashSet<Vec<u8>>) -> Vec<Vec<u8>> {
        self.map
            .keys()
            .filter(|n| !own.contains(*n))
            .cloned()
            .collect()
    }

    /// Whether a name other than `own` may exist here.
    pub(crate) fn has_others(&self, own: &std::collections::HashSet<Vec<u8>>) -> bool {
        self.map.keys().any(|n| !own.contains(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(sql: &str) -> Bytes {
        Bytes::from(format!("P....S1\0{sql}\0\0\0"))
    }

    #[test]
    fn own_record_is_recognised_even_in_a_dirty_session() {
        let mut h = HeldStatements::default();
        let f = frame("select 1");
        h.made(b"S1", f.clone(), false, None);
        assert!(h.is(b"S1", &f, false, None));
    }

    #[test]
    fn an_identical_parse_is_shared_only_between_clean_contexts() {
        let mut h = HeldStatements::default();
        h.made(b"S1", frame("select 1"), true, None);
        let mine = frame("select 1");
        assert!(h.is(b"S1", &mine, true, None));
        assert!(
            !h.is(b"S1", &mine, false, None),
            "the asking session set something"
        );
        h.made(b"S1", frame("select 1"), false, None);
        assert!(
            !h.is(b"S1", &mine, true, None),
            "made after a setting changed"
        );
    }

    #[test]
    fn a_different_or_unknown_statement_is_not_used() {
        let mut h = HeldStatements::default();
        h.made(b"S1", frame("select 1"), true, None);
        assert!(!h.is(b"S1", &frame("select 2"), true, None));
        assert!(!h.is(b"S2", &frame("select 1"), true, None));
        h.unknown(b"S1");
        assert!(h.contains(b"S1"));
        assert!(!h.is(b"S1", &frame("select 1"), true, None));
        h.closed(b"S1");
        assert!(!h.contains(b"S1"));
        h.made(b"S2", frame("select 2"), true, None);
        h.forget_contents();
        assert!(h.contains(b"S2"));
        assert!(!h.is(b"S2", &frame("select 2"), true, None));
    }

    #[test]
    fn a_described_session_uses_only_a_statement_of_its_shape() {
        let mut h = HeldStatements::default();
        let a = Shape::from_raw(1);
        let b = Shape::from_raw(2);
        // Another session's identical Parse, shape unknown: parsed again.
        h.made(b"S1", frame("select 1"), true, None);
        assert!(!h.is(b"S1", &frame("select 1"), true, Some(a)));
        assert!(h.is(b"S1", &frame("select 1"), true, None));
        // Once described here, used by sessions of that shape only.
        h.described(b"S1", a);
        assert!(h.is(b"S1", &frame("select 1"), true, Some(a)));
        assert!(!h.is(b"S1", &frame("select 1"), true, Some(b)));
        // The session's own record without a shape: the server keeps it fixed.
        let own = frame("select 2");
        h.made(b"S2", own.clone(), false, None);
        assert!(h.is(b"S2", &own, false, Some(a)));
    }

    #[test]
    fn excess_names_the_least_recently_used_but_never_a_kept_one() {
        let mut h = HeldStatements::default();
        for n in ["a", "b", "c", "d"] {
            h.made(n.as_bytes(), frame(n), true, None);
        }
        // "a" used again: "b" is now the oldest.
        assert!(h.is(b"a", &frame("a"), true, None));
        assert_eq!(
            h.excess(2, &[b"b".to_vec()]),
            vec![b"c".to_vec(), b"d".to_vec()]
        );
        assert_eq!(h.excess(3, &[]), vec![b"b".to_vec()]);
        assert!(h.excess(4, &[]).is_empty());
    }
}
