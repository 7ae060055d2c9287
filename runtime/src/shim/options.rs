//! The runtime's options from containerd's configuration, and the Accordion configuration they
//! select.
//!
//! containerd's CRI plugin passes a runtime's `options` table to the shim as
//! `runtimeoptions.v1.Options` (`ConfigPath`, `ConfigBody`), the generic type for runtimes that
//! are not runc. `ConfigPath` names an Accordion config file to use instead of
//! /etc/accordion/config.toml; `ConfigBody` holds one inline (TOML). Anything else is refused, so a
//! typo in containerd's config is an error rather than silently ignored.

use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use prost::Message;

use crate::config::{Config, ConfigError};

/// containerd's `runtimeoptions.v1.Options` (pkg/runtimeoptions/v1/api.proto): the wire format is
/// the API, so it is declared here rather than pulling in containerd's Go-generated protos.
#[derive(Clone, PartialEq, Message)]
struct RuntimeOptions {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(string, tag = "2")]
    config_path: String,
    #[prost(string, tag = "3")]
    config_body: String,
}

pub const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

/// Errors in the runtime options.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error(
        "Unsupported runtime options type {0:?}: accordion takes runtimeoptions.v1.Options \
         (ConfigPath or ConfigBody in containerd's runtime options)"
    )]
    Type(String),
    #[error("Malformed runtime options")]
    Decode(#[from] prost::DecodeError),
    #[error("Runtime option ConfigPath {0}: no such file")]
    MissingConfig(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Where a pod's configuration comes from, as the runtime options say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// ACCORDION_CONFIG, else /etc/accordion/config.toml.
    Default,
    /// `ConfigBody`: TOML, inline.
    Body(String),
    /// `ConfigPath`: a file.
    Path(PathBuf),
}

/// Whether `any` holds our runtime options type (containerd writes bare type names, protobuf's
/// `Any::pack` prefixed ones: only the last path segment counts).
pub fn is_runtime_options(any: &Any) -> bool {
    any.type_url.rsplit('/').next() == Some(RUNTIME_OPTIONS_TYPE)
}

/// Decodes containerd's runtime options into where the configuration comes from; touches no file.
pub fn config_source(options: Option<&Any>) -> Result<ConfigSource, OptionsError> {
    let Some(any) = options.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
        return Ok(ConfigSource::Default);
    };
    if !is_runtime_options(any) {
        return Err(OptionsError::Type(any.type_url.clone()));
    }
    let options = RuntimeOptions::decode(any.value.as_slice())?;
    if !options.config_body.trim().is_empty() {
        return Ok(ConfigSource::Body(options.config_body));
    }
    if !options.config_path.is_empty() {
        return Ok(ConfigSource::Path(PathBuf::from(options.config_path)));
    }
    Ok(ConfigSource::Default)
}

/// The configuration for a pod: from the runtime options when they name one, else the default
/// file (ACCORDION_CONFIG or /etc/accordion/config.toml).
pub fn runtime_config(options: Option<&Any>) -> Result<Config, OptionsError> {
    match config_source(options)? {
        ConfigSource::Default => Ok(Config::load_default()?),
        ConfigSource::Body(body) => Ok(Config::parse(
            Path::new("<runtime option ConfigBody>"),
            &body,
        )?),
        ConfigSource::Path(path) => {
            if !path.exists() {
                return Err(OptionsError::MissingConfig(path));
            }
            Ok(Config::load(&path)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, options: &RuntimeOptions) -> Any {
        Any {
            type_url: type_url.into(),
            value: options.encode_to_vec(),
            ..Default::default()
        }
    }

    fn opts(path: &str, body: &str) -> RuntimeOptions {
        RuntimeOptions {
            type_url: String::new(),
            config_path: path.into(),
            config_body: body.into(),
        }
    }

    #[test]
    fn test_config_body_is_parsed_and_checked() {
        let ok = any("runtimeoptions.v1.Options", &opts("", "[vcpus]\nmax = 4\n"));
        assert_eq!(runtime_config(Some(&ok)).unwrap().vcpus.max, 4);
        let bad = any(
            "type.googleapis.com/runtimeoptions.v1.Options",
            &opts("", "bogus_key = 1\n"),
        );
        let e = crate::error_chain(&runtime_config(Some(&bad)).unwrap_err());
        assert!(e.contains("bogus_key"), "{e}");
    }

    #[test]
    fn test_config_source_body_wins_over_path_and_empty_is_default() {
        let both = any(
            "runtimeoptions.v1.Options",
            &opts("/etc/x.toml", "log_level = \"warn\"\n"),
        );
        assert_eq!(
            config_source(Some(&both)).unwrap(),
            ConfigSource::Body("log_level = \"warn\"\n".into())
        );
        let path = any("runtimeoptions.v1.Options", &opts("/etc/x.toml", "  \n"));
        assert_eq!(
            config_source(Some(&path)).unwrap(),
            ConfigSource::Path("/etc/x.toml".into())
        );
        assert_eq!(config_source(None).unwrap(), ConfigSource::Default);
        assert_eq!(
            config_source(Some(&Any::default())).unwrap(),
            ConfigSource::Default
        );
    }

    #[test]
    fn test_unknown_type_and_missing_path_are_refused() {
        let runc = any("containerd.runc.v1.Options", &opts("", ""));
        assert!(matches!(
            runtime_config(Some(&runc)),
            Err(OptionsError::Type(_))
        ));
        let missing = any(
            "runtimeoptions.v1.Options",
            &opts("/nonexistent/accordion.toml", ""),
        );
        assert!(matches!(
            runtime_config(Some(&missing)),
            Err(OptionsError::MissingConfig(_))
        ));
        let garbage = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![0xff, 0xff, 0xff],
            ..Default::default()
        };
        assert!(matches!(
            runtime_config(Some(&garbage)),
            Err(OptionsError::Decode(_))
        ));
    }
}
