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

impl ClusterData {
    /// Reads a clusterdata document, rejecting formats this build does not understand.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ModelError> {
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
