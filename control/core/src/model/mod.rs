//! The cluster model of store-format.md: the `clusterdata` document, the spec, and the
//! infos components publish. Reading accepts the Go stolon's encoding (omitempty, ports as
//! strings, `null` slices) and keeps unknown fields so a rewrite loses nothing.

pub mod cluster;
pub mod info;
pub mod serde_util;
pub mod spec;
pub mod spec_keys;

pub use cluster::*;
pub use info::*;
pub use serde_util::{GoDuration, Timestamp};
pub use spec::*;
pub use spec_keys::{normalize_spec_keys, spec_from_value};

use serde::de::DeserializeOwned;

/// A new random 8-hex-digit UID, the form stolon uses for clusters, dbs and components.
pub fn short_uid() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

/// Why a document could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("malformed {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("unsupported clusterdata formatVersion {found} (this build reads {FORMAT_VERSION})")]
    FormatVersion { found: u64 },
    #[error(transparent)]
    Spec(#[from] SpecError),
}

impl ModelError {
    /// A closure for `map_err` that tags a serde error with what was being read.
    pub fn json(what: &'static str) -> impl Fn(serde_json::Error) -> ModelError {
        move |source| ModelError::Json { what, source }
    }
}

/// Decodes a JSON document of type `T`, naming `what` in the error.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, ModelError> {
    serde_json::from_slice(bytes).map_err(ModelError::json(what))
}

/// Only the version of a clusterdata document (every other field skipped unread).
#[derive(serde::Deserialize)]
struct Version {
    #[serde(rename = "formatVersion")]
    format_version: Option<u64>,
}

impl Version {
    fn is_current(&self) -> bool {
        self.format_version == Some(cluster::FORMAT_VERSION)
    }
}

impl ClusterData {
    /// Reads a clusterdata document, rejecting formats this build does not understand.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ModelError> {
        // Every component reads every write of this document (each proxy, every keeper):
        // an object of this version is read straight into the model, which costs less than
        // half of reading it into a `Value` first. Anything else (another version, another
        // shape, a document the model refuses) takes the checked path below, so its result
        // and error are the same as ever.
        let object = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        if object && serde_json::from_slice::<Version>(bytes).is_ok_and(|v| v.is_current()) {
            if let Ok(cd) = serde_json::from_slice(bytes) {
                return Ok(cd);
            }
        }
        Self::from_json_checked(bytes)
    }

    /// Reads through a `Value`: the shape and version are checked before the model.
    fn from_json_checked(bytes: &[u8]) -> Result<Self, ModelError> {
        // Check the shape and version first, so a future format gets the right error
        // rather than a confusing type error.
        let value: serde_json::Value = decode("clusterdata", bytes)?;
        let not_object = || ModelError::Json {
            what: "clusterdata",
            source: serde::de::Error::custom("invalid type: expected a JSON object"),
        };
        let obj = value.as_object().ok_or_else(not_object)?;
        match obj.get("formatVersion").and_then(|v| v.as_u64()) {
            Some(FORMAT_VERSION) => {}
            Some(found) => return Err(ModelError::FormatVersion { found }),
            None => {
                return Err(ModelError::Json {
                    what: "clusterdata",
                    source: serde::de::Error::custom(
                        "formatVersion missing or not an unsigned integer",
                    ),
                })
            }
        }
        serde_json::from_value(value).map_err(ModelError::json("clusterdata"))
    }

    /// The document as stored. Fails rather than yield something else: a timestamp outside
    /// RFC 3339's years (0 to 9999) cannot be written, and an empty or partial document
    /// must never reach a compare-and-swap.
    pub fn to_json(&self) -> Result<Vec<u8>, ModelError> {
        serde_json::to_vec(self).map_err(ModelError::json("clusterdata"))
    }
}

#[cfg(test)]
mod tests {
    use super::ClusterData;

    fn both(doc: &str) -> (String, String) {
        let show = |r: Result<ClusterData, super::ModelError>| match r {
            Ok(cd) => format!("{cd:?}"),
            Err(e) => format!("error: {e}"),
        };
        (
            show(ClusterData::from_json(doc.as_bytes())),
            show(ClusterData::from_json_checked(doc.as_bytes())),
        )
    }

    /// The direct read gives what the checked read gives, document or error, for good
    /// documents, odd ones and bad ones.
    #[test]
    fn the_direct_read_agrees_with_the_checked_read() {
        let golden = include_str!("../../tests/golden/clusterdata-go.json");
        let mut doc: serde_json::Value = serde_json::from_str(golden).expect("golden");
        let mut cases: Vec<String> = vec![golden.to_string(), format!("  \n{golden}")];
        doc["futureTopLevel"] = serde_json::json!({"a": [1, 2]});
        doc["cluster"]["status"]["futureStatus"] = serde_json::json!("x");
        cases.push(doc.to_string());
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut d: serde_json::Value = serde_json::from_str(golden).expect("golden");
            f(&mut d);
            d.to_string()
        };
        cases.push(with(&|d| d["formatVersion"] = 2.into()));
        cases.push(with(&|d| d["formatVersion"] = "1".into()));
        cases.push(with(&|d| {
            drop(d.as_object_mut().map(|o| o.remove("formatVersion")))
        }));
        cases.push(with(&|d| {
            drop(d.as_object_mut().map(|o| o.remove("cluster")))
        }));
        cases.push(with(&|d| d["dbs"] = serde_json::Value::Null));
        cases.push(with(&|d| d["keepers"] = serde_json::json!([])));
        cases.push(with(&|d| d["cluster"]["spec"]["sleepInterval"] = 5.into()));
        // Duplicate keys: the checked read keeps the last one, the direct read refuses the
        // document and falls back to the checked one.
        cases.push(golden.replacen("{", r#"{"proxy":{"generation":99},"#, 1));
        cases.push(golden.replacen("{", r#"{"formatVersion":1,"#, 1));
        for bad in [
            "",
            "[]",
            "[1]",
            "null",
            "1",
            "\"x\"",
            "{",
            "{}",
            r#"{"formatVersion":1}"#,
        ] {
            cases.push(bad.to_string());
        }
        for doc in &cases {
            let (direct, checked) = both(doc);
            assert_eq!(direct, checked, "for {doc}");
        }
        assert!(
            !both(golden).0.starts_with("error"),
            "the golden document reads"
        );
    }
}
