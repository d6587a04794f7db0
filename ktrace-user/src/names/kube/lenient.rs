//! An API object that may not deserialize. kube's watcher parses a whole
//! list response, or a watch event, as one value: one object whose JSON is
//! not its kind's (a field of the wrong type, from a buggy controller or a
//! newer API) would fail the whole list, and the watcher would retry the
//! same failing list forever, naming nothing. Watching [`Lenient<K>`]
//! instead, such an object arrives as [`Lenient::Malformed`] with what can
//! be read of its metadata; the cache counts it and drops its old name.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{Deserialize, DeserializeOwned, Deserializer};
use serde_json::Value;

// The objects pass one at a time (each watcher item is boxed already):
// boxing `K` too would only add an allocation per object.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Lenient<K> {
    Ok(K),
    /// The object's JSON did not deserialize as `K`: its name (when it has
    /// one) and why.
    Malformed {
        meta: ObjectMeta,
        error: String,
    },
}

impl<K> Lenient<K> {
    pub fn ok(&self) -> Option<&K> {
        match self {
            Lenient::Ok(k) => Some(k),
            Lenient::Malformed { .. } => None,
        }
    }
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Any JSON value parses; only then is it asked to be a `K`.
        let v = Value::deserialize(d)?;
        Ok(match K::deserialize(&v) {
            Ok(k) => Lenient::Ok(k),
            Err(e) => Lenient::Malformed {
                meta: readable_meta(&v),
                error: e.to_string(),
            },
        })
    }
}

/// The metadata fields that can be read from an object that did not parse
/// (the watcher needs the resource version; the cache, the name).
fn readable_meta(v: &Value) -> ObjectMeta {
    let m = &v["metadata"];
    let s = |k: &str| m[k].as_str().map(String::from);
    ObjectMeta {
        name: s("name"),
        namespace: s("namespace"),
        resource_version: s("resourceVersion"),
        ..Default::default()
    }
}

impl<K: kube::Resource> kube::Resource for Lenient<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        match self {
            Lenient::Ok(k) => k.meta(),
            Lenient::Malformed { meta, .. } => meta,
        }
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Lenient::Ok(k) => k.meta_mut(),
            Lenient::Malformed { meta, .. } => meta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use kube::Resource;

    #[test]
    fn an_object_of_the_wrong_shape_keeps_its_name_and_why() {
        let good =
            r#"{"metadata": {"name": "a", "namespace": "n"}, "spec": {"clusterIP": "10.96.0.1"}}"#;
        let l: Lenient<Service> = serde_json::from_str(good).unwrap();
        assert_eq!(l.ok().unwrap().meta().name.as_deref(), Some("a"));
        let bad = r#"{"metadata": {"name": "b", "namespace": "n", "resourceVersion": "7"}, "spec": {"ports": "not a list"}}"#;
        let l: Lenient<Service> = serde_json::from_str(bad).unwrap();
        assert!(l.ok().is_none());
        assert_eq!(l.meta().name.as_deref(), Some("b"));
        assert_eq!(l.meta().resource_version.as_deref(), Some("7"));
        // Not even an object: still a value, with no name.
        let l: Lenient<Service> = serde_json::from_str("5").unwrap();
        assert!(matches!(l, Lenient::Malformed { ref meta, .. } if meta.name.is_none()));
        // A list of them parses whole (what the watcher's list needs).
        let list = format!("[{good}, {bad}, 5]");
        let all: Vec<Lenient<Service>> = serde_json::from_str(&list).unwrap();
        assert_eq!(all.iter().filter(|l| l.ok().is_some()).count(), 1);
        // Broken JSON is still an error (the connection, not an object).
        assert!(serde_json::from_str::<Lenient<Service>>("{").is_err());
    }
}
