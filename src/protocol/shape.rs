//! The shape of a prepared statement: what a Describe of it tells a client.
//!
//! A client that described a statement decodes its rows with the column types
//! it was told (binary formats above all). PostgreSQL keeps a protocol-level
//! statement's result fixed: when a schema change would alter it, the cached
//! statement fails with `0A000 cached plan must not change result type`
//! instead of returning rows of another shape. pgpilot parses a session's
//! statement again on other connections, so it compares the answer to its own
//! Describe there with the one the client got, by a hash of what PostgreSQL
//! compares: the parameter types (ParameterDescription) and, per result
//! column, its name, type OID and type modifier (RowDescription), or NoData.
//! Table OIDs and column numbers are left out: a table dropped and created
//! again does not change a statement's result for PostgreSQL either.

/// A hash of a statement's ParameterDescription and RowDescription/NoData.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Shape(u64);

impl Shape {
    /// A shape from a raw hash value (tests).
    #[cfg(test)]
    pub(crate) fn from_raw(v: u64) -> Shape {
        Shape(v)
    }
}

/// FNV-1a, 64 bits: a few dozen bytes per statement, on a rare path.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShapeHasher(u64);

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl ShapeHasher {
    fn feed(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }

    /// Start with a ParameterDescription body (the whole body: count and
    /// type OIDs).
    pub(crate) fn params(body: &[u8]) -> ShapeHasher {
        let mut h = ShapeHasher(FNV_OFFSET);
        h.feed(b"t");
        h.feed(body);
        h
    }

    /// Finish with the RowDescription body (`Some`) or NoData (`None`).
    /// A malformed RowDescription hashes what could be read of it.
    pub(crate) fn finish(mut self, row_description: Option<&[u8]>) -> Shape {
        let Some(body) = row_description else {
            self.feed(b"n");
            return Shape(self.0);
        };
        self.feed(b"T");
        let Some((count, mut rest)) = body.split_first_chunk::<2>() else {
            return Shape(self.0);
        };
        self.feed(count);
        for _ in 0..i16::from_be_bytes(*count).max(0) {
            let Some(nul) = rest.iter().position(|b| *b == 0) else {
                break;
            };
            // name, NUL, then table OID (4), column number (2), type OID (4),
            // type length (2), type modifier (4), format (2).
            let Some(field) = rest.get(..nul + 19) else {
                break;
            };
            self.feed(&field[..=nul]);
            self.feed(&field[nul + 7..nul + 11]);
            self.feed(&field[nul + 13..nul + 17]);
            rest = &rest[nul + 19..];
        }
        Shape(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, table: u32, typ: u32, typmod: i32) -> Vec<u8> {
        let mut v = name.as_bytes().to_vec();
        v.push(0);
        v.extend_from_slice(&table.to_be_bytes());
        v.extend_from_slice(&1i16.to_be_bytes());
        v.extend_from_slice(&typ.to_be_bytes());
        v.extend_from_slice(&4i16.to_be_bytes());
        v.extend_from_slice(&typmod.to_be_bytes());
        v.extend_from_slice(&0i16.to_be_bytes());
        v
    }

    fn rows(cols: &[Vec<u8>]) -> Vec<u8> {
        let mut v = (cols.len() as i16).to_be_bytes().to_vec();
        for c in cols {
            v.extend_from_slice(c);
        }
        v
    }

    fn shape(params: &[u8], cols: Option<&[Vec<u8>]>) -> Shape {
        let body = cols.map(rows);
        ShapeHasher::params(params).finish(body.as_deref())
    }

    #[test]
    fn types_typmods_names_and_parameters_count_but_table_oids_do_not() {
        let no_params = [0u8, 0];
        let int4 = [column("a", 100, 23, -1), column("b", 100, 23, -1)];
        let base = shape(&no_params, Some(&int4));
        let recreated = [column("a", 200, 23, -1), column("b", 200, 23, -1)];
        assert_eq!(base, shape(&no_params, Some(&recreated)));
        let real = [column("a", 100, 23, -1), column("b", 100, 700, -1)];
        assert_ne!(base, shape(&no_params, Some(&real)));
        let renamed = [column("a", 100, 23, -1), column("c", 100, 23, -1)];
        assert_ne!(base, shape(&no_params, Some(&renamed)));
        let typmod = [column("a", 100, 23, -1), column("b", 100, 23, 5)];
        assert_ne!(base, shape(&no_params, Some(&typmod)));
        assert_ne!(base, shape(&no_params, Some(&int4[..1])));
        assert_ne!(base, shape(&no_params, None));
        let one_param = [0u8, 1, 0, 0, 0, 23];
        assert_ne!(base, shape(&one_param, Some(&int4)));
        // Truncated input hashes without panicking.
        let _ = ShapeHasher::params(&[]).finish(Some(&[0, 5, b'x']));
    }
}
