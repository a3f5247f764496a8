//! Standard Webhooks signatures on outgoing postbacks (<https://www.standardwebhooks.com>):
//! `webhook-signature: v1,<base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, one
//! entry per key, space-separated, so a receiver can verify with the old key or the new one
//! while a key rotates.

use super::http::SigningKeys;
use super::Request;
use base64::Engine;
use hmac::{Hmac, Mac};

/// The headers a signature sets (lower-case).
pub const HEADERS: [&str; 3] = ["webhook-id", "webhook-timestamp", "webhook-signature"];

/// The three headers for `req` as message `id` at `timestamp` (unix seconds).
pub fn standard_webhooks(
    req: &Request,
    keys: &SigningKeys,
    id: &str,
    timestamp: i64,
) -> Vec<(String, String)> {
    let body = req.body.as_deref().unwrap_or_default();
    let signatures: Vec<String> = keys
        .0
        .iter()
        .filter_map(|k| {
            let mut m = Hmac::<sha2::Sha256>::new_from_slice(k).ok()?;
            m.update(id.as_bytes());
            m.update(b".");
            m.update(timestamp.to_string().as_bytes());
            m.update(b".");
            m.update(body);
            let sig = base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes());
            Some(format!("v1,{sig}"))
        })
        .collect();
    vec![
        ("webhook-id".into(), id.to_string()),
        ("webhook-timestamp".into(), timestamp.to_string()),
        ("webhook-signature".into(), signatures.join(" ")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the specification's reference libraries: secret
    /// `whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw`, id `msg_p5jXN8AQM9LWM0D4loKWxJek`,
    /// timestamp 1614265330, body `{"test": 2432232314}`.
    #[test]
    fn matches_the_reference_signature() {
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let req = Request {
            method: super::super::Method::Post,
            url: "https://example.com/".into(),
            headers: Vec::new(),
            body: Some(br#"{"test": 2432232314}"#.to_vec()),
        };
        let h = standard_webhooks(
            &req,
            &SigningKeys(vec![key]),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
        );
        assert_eq!(h[2].1, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
