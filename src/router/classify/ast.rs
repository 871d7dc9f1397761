//! Classification of statements sqlparser parsed: which statement kinds can be
//! reads, and a visitor that finds writes hidden anywhere inside them (writable
//! CTEs, locking clauses, `SELECT INTO`, function calls). Part of
//! [`super`]; see there for the rules.

use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};

use sqlparser::ast::{
    ContextModifier, CopyTarget, DescribeAlias, DiscardObject, Expr, FunctionArg, FunctionArgExpr,
    FunctionArguments, Ident, ObjectName, Query, Reset, Select, Set, Statement, TableFactor,
    TransactionAccessMode, TransactionIsolationLevel, TransactionMode, UtilityOption, Value, Visit,
    Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::lexical::fallback;
use super::{
    Access, FunctionPolicy, NODE_LOCAL_FUNCTIONS, NODE_LOCAL_RELATIONS, Part, READ_ONLY_FUNCTIONS,
    SESSION_ADVISORY_LOCKS, STICKY_SETTINGS, SqlParserClassifier, TxControl, UnknownIs, node_local,
};
use crate::router::normalize::Statement as Piece;
use crate::router::relations::RelationName;

impl SqlParserClassifier {
    /// Parse one statement (never panicking) and classify it; lexical fallback on failure.
    pub(super) fn classify_piece(&self, piece: &Piece<'_>) -> Part {
        let rewritten;
        let mut text = piece.text;
        if let Some(first) = piece.head.first().filter(|t| t.is_word("table")) {
            // sqlparser does not know `TABLE t`; it means `SELECT * FROM t`.
            rewritten = format!(
                "SELECT * FROM {}",
                text.get(first.text.len()..).unwrap_or("")
            );
            text = &rewritten;
        }
        let parsed = catch_unwind(AssertUnwindSafe(|| {
            match Parser::parse_sql(&PostgreSqlDialect {}, text) {
                Ok(stmts) if stmts.len() == 1 => Some(self.statement(&stmts[0])),
                _ => None,
            }
        }));
        match parsed {
            Ok(Some(part)) => part,
            _ => fallback(piece),
        }
    }

    /// Classify one parsed statement. Only the kinds listed here can be reads.
    fn statement(&self, stmt: &Statement) -> Part {
        match stmt {
            Statement::Query(_) => self.scanned(stmt),
            Statement::Explain {
                describe_alias,
                analyze,
                statement,
                options,
                ..
            } => {
                if !matches!(describe_alias, DescribeAlias::Explain) {
                    return Part::write();
                }
                let analyze = *analyze || options.iter().flatten().any(is_analyze_option);
                let inner = self.statement(statement);
                if !analyze {
                    // Not run, but planning opens the relations (a standby
                    // refuses unlogged ones), and `EXPLAIN EXECUTE q` plans
                    // the session's statement: it needs `q` where it runs.
                    return Part {
                        relations: inner.relations,
                        execute: inner.execute,
                        ..Part::default()
                    };
                }
                // EXPLAIN ANALYZE runs the statement: it is as much a write as it is.
                Part {
                    write: inner.write,
                    unknown_write: inner.unknown_write,
                    sticky: inner.sticky,
                    execute: inner.execute,
                    parse_failed: inner.parse_failed,
                    unknown: inner.unknown,
                    relations: inner.relations,
                    catalog_change: inner.catalog_change,
                    lists_statements: inner.lists_statements,
                    ..Part::default()
                }
            }
            Statement::Copy { to, target, .. } => {
                let mut part = self.scanned(stmt);
                if !(*to && matches!(target, CopyTarget::Stdout)) {
                    part.write = true;
                }
                part
            }
            Statement::ShowVariable { .. } => Part::default(),
            Statement::StartTransaction {
                modes,
                statements,
                exception,
                has_end_keyword,
                ..
            } => {
                if !statements.is_empty() || exception.is_some() || *has_end_keyword {
                    return Part::write();
                }
                let read_only = read_only_mode(modes) == Some(true);
                let mut part = Part::tx(TxControl::Begin { read_only });
                // A hot standby can start neither a READ WRITE transaction nor a
                // SERIALIZABLE one (READ ONLY or not): such a BEGIN needs the primary.
                part.write = read_only_mode(modes) == Some(false) || serializable(modes);
                part
            }
            Statement::Commit { .. } => Part::tx(TxControl::Commit),
            Statement::Rollback {
                savepoint: Some(_), ..
            } => Part::tx(TxControl::Savepoint),
            Statement::Rollback { .. } => Part::tx(TxControl::Rollback),
            Statement::Savepoint { .. } | Statement::ReleaseSavepoint { .. } => {
                Part::tx(TxControl::Savepoint)
            }
            Statement::Set(set) => {
                let mut part = self.scanned(stmt);
                apply_set(set, &mut part);
                part
            }
            Statement::Reset(reset) => {
                let mut part = Part {
                    session_state: true,
                    ..Part::default()
                };
                match &reset.reset {
                    Reset::ALL => part.read_only_default = Some(false),
                    Reset::SessionAuthorization => {}
                    Reset::ConfigurationParameter(name) => setting(&mut part, name, None, false),
                }
                part
            }
            Statement::Discard { object_type } => Part {
                session_state: true,
                read_only_default: matches!(object_type, DiscardObject::ALL).then_some(false),
                ..Part::default()
            },
            Statement::Deallocate { name, .. } => {
                let all = name.quote_style.is_none() && name.value.eq_ignore_ascii_case("all");
                Part {
                    session_state: true,
                    deallocate: Some((!all).then(|| fold(name))),
                    ..Part::default()
                }
            }
            Statement::Prepare {
                name, statement, ..
            } => {
                let inner = self.statement(statement);
                // Unknown functions cannot be resolved later for EXECUTE: primary.
                let plain = inner.tx.is_none() && !inner.session_state && inner.unknown.is_empty();
                let access = if plain { inner.access() } else { Access::Write };
                Part {
                    prepare: Some((fold(name), access)),
                    sticky: inner.sticky,
                    ..Part::default()
                }
            }
            Statement::Execute {
                name,
                immediate,
                into,
                using,
                output,
                default,
                ..
            } => {
                let mut part = self.scanned(stmt);
                let plain =
                    !*immediate && into.is_empty() && using.is_empty() && !*output && !*default;
                match name.as_ref().and_then(single_ident) {
                    Some(id) if plain => part.execute = Some(fold(id)),
                    _ => part.write = true,
                }
                part
            }
            other => {
                let mut part = self.scanned(other);
                part.write = true;
                part.catalog_change = !matches!(
                    other,
                    Statement::Insert(_)
                        | Statement::Update(_)
                        | Statement::Delete(_)
                        | Statement::Merge(_)
                        | Statement::Truncate(_)
                        | Statement::LISTEN { .. }
                        | Statement::UNLISTEN { .. }
                        | Statement::NOTIFY { .. }
                );
                part.sticky |= match other {
                    Statement::CreateTable(t) => t.temporary || is_pg_temp(&t.name),
                    Statement::CreateView(v) => v.temporary || is_pg_temp(&v.name),
                    Statement::CreateSequence {
                        temporary, name, ..
                    } => *temporary || is_pg_temp(name),
                    Statement::LISTEN { .. } => true,
                    Statement::Declare { stmts } => stmts.iter().any(|d| d.hold == Some(true)),
                    _ => false,
                };
                part
            }
        }
    }

    /// Walk the whole statement for writes hidden in queries and function calls.
    fn scanned(&self, stmt: &Statement) -> Part {
        let mut scan = Scan {
            policy: &self.policy,
            depth: 0,
            part: Part::default(),
        };
        let _ = stmt.visit(&mut scan);
        scan.part
    }
}

/// Finds, anywhere in a statement: nested data-modifying statements (writable
/// CTEs), locking clauses, `SELECT INTO`, and function calls.
struct Scan<'a> {
    policy: &'a FunctionPolicy,
    depth: usize,
    part: Part,
}

impl Visitor for Scan<'_> {
    type Break = ();

    fn pre_visit_statement(&mut self, stmt: &Statement) -> ControlFlow<()> {
        self.depth += 1;
        if self.depth > 1 && !matches!(stmt, Statement::Query(_)) {
            self.part.write = true;
        }
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, _stmt: &Statement) -> ControlFlow<()> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if !query.locks.is_empty() || query.for_clause.is_some() || !query.pipe_operators.is_empty()
        {
            self.part.write = true;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if let Some(into) = &select.into {
            self.part.write = true;
            let pg_temp = into.targets.iter().any(|t| match t {
                Expr::CompoundIdentifier(ids) => {
                    ids.len() > 1 && ids[0].value.starts_with("pg_temp")
                }
                _ => false,
            });
            if into.temporary || pg_temp {
                self.part.sticky = true;
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        let idents: Vec<&Ident> = relation.0.iter().filter_map(|p| p.as_ident()).collect();
        if let [.., schema, name] | [schema @ name] = idents.as_slice() {
            let qualified = idents.len() > 1;
            let relation = RelationName {
                schema: qualified.then(|| fold(schema)),
                name: fold(name),
            };
            if self.primary_relation(&relation) {
                self.part.write = true;
                self.part.lists_statements |= relation.name == "pg_prepared_statements";
            }
            self.part.relations.push(relation);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table {
                name,
                args: Some(a),
                ..
            } => self.function(name, &a.args),
            TableFactor::Function { name, args, .. } => self.function(name, args),
            TableFactor::Pivot { .. }
            | TableFactor::Unpivot { .. }
            | TableFactor::UnpivotExpr { .. }
            | TableFactor::MatchRecognize { .. } => self.part.write = true,
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            let args = match &f.args {
                FunctionArguments::List(list) => &list.args[..],
                _ => &[],
            };
            self.function(&f.name, args);
        }
        ControlFlow::Continue(())
    }
}

impl Scan<'_> {
    /// Whether reading `r` needs the primary: a built-in node-local view, or
    /// one of `routing.primary_relations`.
    fn primary_relation(&self, r: &RelationName) -> bool {
        let catalog = r.schema.as_deref().is_none_or(|s| s == "pg_catalog");
        if catalog && node_local(&r.name, NODE_LOCAL_RELATIONS) {
            return true;
        }
        let listed = &self.policy.primary_relations;
        !listed.is_empty()
            && (listed.contains(&r.name)
                || r.schema
                    .as_ref()
                    .is_some_and(|s| listed.contains(&format!("{s}.{}", r.name))))
    }

    /// Judge a call of `name`.
    fn function(&mut self, name: &ObjectName, args: &[FunctionArg]) {
        let idents: Vec<&Ident> = name.0.iter().filter_map(|p| p.as_ident()).collect();
        let Some(last) = idents.last().filter(|_| idents.len() == name.0.len()) else {
            self.part.write = true;
            return;
        };
        let lower = last.value.to_ascii_lowercase();
        if SESSION_ADVISORY_LOCKS.contains(&lower.as_str()) {
            self.part.sticky = true;
        }
        if lower == "set_config" && !is_true_literal(args.get(2)) {
            self.part.sticky = true;
        }
        if self.policy.write_functions.contains(&lower) {
            self.part.write = true;
            return;
        }
        let folded = fold(last);
        let catalog = match idents.len() {
            1 => true,
            2 => fold(idents[0]) == "pg_catalog",
            _ => false,
        };
        if catalog && node_local(&folded, NODE_LOCAL_FUNCTIONS) {
            // Describes the node that answers: the primary's is meant.
            self.part.write = true;
            return;
        }
        if catalog && READ_ONLY_FUNCTIONS.binary_search(&folded.as_str()).is_ok() {
            return;
        }
        match &self.policy.read_only_functions {
            Some(allow) if allow.contains(&folded) => {}
            Some(_) => {
                self.part.unknown_write = true;
                self.part.unknown.push(folded);
            }
            None => {
                if self.policy.unknown == UnknownIs::Write {
                    self.part.unknown_write = true;
                }
                self.part.unknown.push(folded);
            }
        }
    }
}

/// An identifier as PostgreSQL folds it: lower case unless quoted.
fn fold(id: &Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_ascii_lowercase()
    }
}

fn single_ident(name: &ObjectName) -> Option<&Ident> {
    match name.0.as_slice() {
        [part] => part.as_ident(),
        _ => None,
    }
}

/// `pg_temp.x` (or `pg_temp_N.x`) names a temporary object.
fn is_pg_temp(name: &ObjectName) -> bool {
    name.0.len() > 1
        && name.0[0]
            .as_ident()
            .is_some_and(|id| fold(id).starts_with("pg_temp"))
}

fn is_true_literal(arg: Option<&FunctionArg>) -> bool {
    matches!(
        arg,
        Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))) if v.value == Value::Boolean(true)
    )
}

/// `ANALYZE` (or `ANALYSE`) in `EXPLAIN (...)` options, unless explicitly false/off.
fn is_analyze_option(opt: &UtilityOption) -> bool {
    let name = &opt.name.value;
    if !name.eq_ignore_ascii_case("analyze") && !name.eq_ignore_ascii_case("analyse") {
        return false;
    }
    match &opt.arg {
        Some(Expr::Value(v)) => v.value != Value::Boolean(false),
        Some(Expr::Identifier(id)) => {
            !(id.quote_style.is_none()
                && (id.value.eq_ignore_ascii_case("off") || id.value.eq_ignore_ascii_case("false")))
        }
        _ => true,
    }
}

/// The access mode among transaction modes: `Some(true)` READ ONLY, `Some(false)`
/// READ WRITE (wins over READ ONLY), `None` if not given.
fn read_only_mode(modes: &[TransactionMode]) -> Option<bool> {
    let mut mode = None;
    for m in modes {
        match m {
            TransactionMode::AccessMode(TransactionAccessMode::ReadWrite) => return Some(false),
            TransactionMode::AccessMode(TransactionAccessMode::ReadOnly) => mode = Some(true),
            TransactionMode::IsolationLevel(_) => {}
        }
    }
    mode
}

/// `ISOLATION LEVEL SERIALIZABLE` among transaction modes (a hot standby refuses
/// serializable transactions: 0A000 "cannot use serializable mode in a hot standby").
fn serializable(modes: &[TransactionMode]) -> bool {
    modes.iter().any(|m| {
        matches!(
            m,
            TransactionMode::IsolationLevel(TransactionIsolationLevel::Serializable)
        )
    })
}

/// Session state and stickiness of a `SET`.
fn apply_set(set: &Set, part: &mut Part) {
    part.session_state = true;
    match set {
        Set::SingleAssignment {
            scope,
            variable,
            values,
            ..
        } => {
            let local = matches!(scope, Some(ContextModifier::Local));
            setting(part, variable, Some(values), local);
        }
        Set::ParenthesizedAssignments { variables, .. } => {
            for v in variables {
                setting(part, v, Some(&[]), false);
            }
        }
        Set::MultipleAssignments { assignments } => {
            for a in assignments {
                setting(part, &a.name, Some(std::slice::from_ref(&a.value)), false);
            }
        }
        Set::SetTransaction {
            modes,
            session: true,
            ..
        } => {
            match read_only_mode(modes) {
                Some(true) => part.read_only_default = Some(true),
                Some(false) => {
                    part.read_only_default = Some(false);
                    part.sticky = true;
                }
                None => {}
            }
            // Every later transaction is serializable: none can run on a standby.
            part.sticky |= serializable(modes);
        }
        Set::SetSessionParam(_) => part.write = true,
        _ => {}
    }
}

/// A SET (`value` = `Some(values)`) or RESET (`None`) of the setting `name`.
fn setting(part: &mut Part, name: &ObjectName, value: Option<&[Expr]>, local: bool) {
    let Some(id) = single_ident(name) else {
        return; // custom `a.b` settings are never sticky
    };
    let name = fold(id);
    if name == "default_transaction_read_only" {
        match value.and_then(bool_setting) {
            Some(true) => {
                if !local {
                    part.read_only_default = Some(true);
                }
            }
            // off, DEFAULT, RESET, or a value we cannot read: not read-only.
            _ => {
                part.sticky = true;
                if !local {
                    part.read_only_default = Some(false);
                }
            }
        }
    } else if name == "default_transaction_isolation" {
        // Serializable by default: every later transaction (and every read in
        // autocommit) would fail on a standby. RESET / DEFAULT restore the
        // configured default, which is not taken to be serializable.
        if !local && value.is_some_and(|v| !known_non_serializable(v)) {
            part.sticky = true;
        }
    } else if STICKY_SETTINGS.contains(&name.as_str()) {
        part.sticky = true;
    }
}

/// A `default_transaction_isolation` value known not to be `serializable`
/// (unreadable values count as serializable).
fn known_non_serializable(values: &[Expr]) -> bool {
    let text = match values {
        [Expr::Value(v)] => match &v.value {
            Value::SingleQuotedString(s) => s.as_str(),
            _ => return false,
        },
        [Expr::Identifier(id)] => id.value.as_str(),
        _ => return false,
    };
    let text = text.trim().to_ascii_lowercase();
    matches!(
        text.as_str(),
        "read committed" | "read uncommitted" | "repeatable read" | "default"
    )
}

/// A boolean setting value as PostgreSQL's `parse_bool` reads it.
fn bool_setting(values: &[Expr]) -> Option<bool> {
    let text = match values {
        [Expr::Value(v)] => match &v.value {
            Value::Boolean(b) => return Some(*b),
            Value::Number(n, _) => n.as_str(),
            Value::SingleQuotedString(s) => s.as_str(),
            _ => return None,
        },
        [Expr::Identifier(id)] => id.value.as_str(),
        _ => return None,
    };
    parse_bool(text)
}

/// PostgreSQL's `parse_bool`: unique prefixes of true/false/yes/no/on/off, and 1/0.
fn parse_bool(s: &str) -> Option<bool> {
    let l = s.trim().to_ascii_lowercase();
    let prefix = |word: &str, min: usize| l.len() >= min && word.starts_with(l.as_str());
    match l.as_bytes().first()? {
        b't' if prefix("true", 1) => Some(true),
        b'f' if prefix("false", 1) => Some(false),
        b'y' if prefix("yes", 1) => Some(true),
        b'n' if prefix("no", 1) => Some(false),
        b'o' if prefix("on", 2) => Some(true),
        b'o' if prefix("off", 2) => Some(false),
        b'1' if l == "1" => Some(true),
        b'0' if l == "0" => Some(false),
        _ => None,
    }
}
