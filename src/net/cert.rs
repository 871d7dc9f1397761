//! What pgpilot reads in X.509 certificates (DER), without a parser
//! crate: RFC 5929's `tls-server-end-point` hash for SCRAM channel binding,
//! and the subject's common name for `cert` authentication.

use sha2::Digest;

/// One DER element: (tag, contents, what follows). `None` on malformed input.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// RFC 5929 `tls-server-end-point`: the certificate's hash with its signature
/// algorithm's hash, SHA-256 for MD5 and SHA-1; `None` for algorithms that
/// name none (Ed25519, RSA-PSS), as PostgreSQL then offers no channel binding.
pub(crate) fn end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
    let (SEQUENCE, body, _) = der(cert)? else {
        return None;
    };
    let (SEQUENCE, _tbs, rest) = der(body)? else {
        return None;
    };
    let (SEQUENCE, alg, _) = der(rest)? else {
        return None;
    };
    let (OID, oid, _) = der(alg)? else {
        return None;
    };
    // 1.2.840.113549.1.1.{4,5,11,12,13,14} and 1.2.840.10045.4.{1,3.2,3.3,3.4}
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    enum H {
        S256,
        S384,
        S512,
    }
    let h = match oid {
        [p @ .., last] if p == RSA => match last {
            4 | 5 | 11 | 14 => H::S256,
            12 => H::S384,
            13 => H::S512,
            _ => return None,
        },
        [p @ .., 1] if p == ECDSA => H::S256,
        [p @ .., 3, last] if p == ECDSA => match last {
            1 | 2 => H::S256,
            3 => H::S384,
            4 => H::S512,
            _ => return None,
        },
        _ => return None,
    };
    Some(match h {
        H::S256 => sha2::Sha256::digest(cert).to_vec(),
        H::S384 => sha2::Sha384::digest(cert).to_vec(),
        H::S512 => sha2::Sha512::digest(cert).to_vec(),
    })
}

/// The subject's common name (the last CN attribute, as PostgreSQL takes
/// it), for `cert` authentication.
pub(crate) fn common_name(cert: &[u8]) -> Option<String> {
    let (SEQUENCE, body, _) = der(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = der(body)? else {
        return None;
    };
    let mut fields = tbs;
    // [0] version is optional.
    if fields.first() == Some(&0xa0) {
        fields = der(fields)?.2;
    }
    // serial, signature, issuer, validity, subject.
    for _ in 0..4 {
        fields = der(fields)?.2;
    }
    let (SEQUENCE, mut rdns, _) = der(fields)? else {
        return None;
    };
    let mut cn = None;
    while !rdns.is_empty() {
        let (SET, mut set, rest) = der(rdns)? else {
            return None;
        };
        rdns = rest;
        while !set.is_empty() {
            let (SEQUENCE, atv, rest) = der(set)? else {
                return None;
            };
            set = rest;
            let (OID, oid, value) = der(atv)? else {
                return None;
            };
            if oid == [0x55, 0x04, 0x03] {
                let (_, text, _) = der(value)?;
                cn = Some(String::from_utf8(text.to_vec()).ok()?);
            }
        }
    }
    cn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_point_hash_and_common_name_of_a_generated_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "pgpilot tests");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der();
        // rcgen signs with ECDSA P-256 SHA-256.
        assert_eq!(
            end_point_hash(der).unwrap(),
            sha2::Sha256::digest(der).to_vec()
        );
        assert_eq!(common_name(der).as_deref(), Some("alice"));
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = params.self_signed(&ed).unwrap();
        assert_eq!(end_point_hash(cert.der()), None);
        assert_eq!(common_name(cert.der()).as_deref(), Some("alice"));
        for bad in [&[][..], &[0x30, 0x81], &der[..der.len() / 2]] {
            assert_eq!(end_point_hash(bad), None);
            assert_eq!(common_name(bad), None);
        }
    }
}
