//! containerd's configuration: which schema a host runs, the drop-in that registers Accordion's
//! runtime, and the one `imports` entry that loads it.
//!
//! Two facts from containerd's config loader (services/server/config in 1.7,
//! cmd/containerd/server/config in 2.x) shape this:
//! - containerd 1.x merges an imported file by replacing each plugin section it names *entirely*.
//!   A drop-in holding only `[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.accordion]`
//!   would wipe the host's CRI settings (runc's SystemdCgroup, the sandbox image, CNI dirs). So a
//!   schema-2 drop-in carries a copy of the CRI section containerd would otherwise use, plus our
//!   runtime. containerd 2.x merges plugin tables key by key, so a schema-3 drop-in holds only ours.
//! - A drop-in may not have a higher `version` than the root config; 2.x migrates lower ones.
//!   The drop-in therefore always uses the root config's schema.

use std::fs;
use std::path::{Path, PathBuf};

use toml_edit::{value, Array, DocumentMut, Item, Table};

use super::manifest::under;

/// The runtime name (CRI handler, what a RuntimeClass's `handler` names).
pub const RUNTIME_NAME: &str = "accordion";
/// The runtime type: containerd runs `containerd-shim-accordion-v2` for it.
pub const RUNTIME_TYPE: &str = "io.containerd.accordion.v2";
/// CRI's plugin in config schema 2 (containerd 1.5–1.7, and 2.x after migration).
const CRI_V2: &str = "io.containerd.grpc.v1.cri";
/// CRI's runtime plugin in config schema 3 (containerd 2.x).
const CRI_V3_RUNTIME: &str = "io.containerd.cri.v1.runtime";

/// Errors about containerd's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} is not valid TOML: {1}")]
    Parse(PathBuf, String),
    #[error(
        "{0} is a version {1} containerd config; accordion supports version 2 (containerd 1.5–1.7) \
         and version 3 (containerd 2.x). Migrate it with `containerd config migrate`"
    )]
    Version(PathBuf, i64),
    #[error("{0}: `imports` must be an array of strings")]
    Imports(PathBuf),
    #[error(
        "--containerd-version {flag} does not match {path}, a version {schema} config \
         (containerd {expected})"
    )]
    Mismatch {
        flag: u8,
        path: PathBuf,
        schema: i64,
        expected: &'static str,
    },
    #[error(
        "Cannot tell which containerd this host runs: {0} does not exist and {1}. \
         Pass --containerd-version 1 or 2"
    )]
    Unknown(PathBuf, String),
    #[error(
        "containerd 1.x has no {0}, and the installer needs its built-in defaults to keep them \
         ({1}). Create it with `containerd config default > {0}` and run the install again"
    )]
    NoDefaults(PathBuf, String),
    #[error(
        "{0} sets the CRI plugin's section and is loaded after accordion's drop-in, so containerd \
         1.x would ignore the drop-in's runtime. Import {1} after it, or add the runtime by hand \
         (docs/install.md)"
    )]
    ShadowedDropin(PathBuf, PathBuf),
}

/// The config schema containerd reads on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// `version = 2`: containerd 1.5–1.7 (2.x reads it too, migrating it).
    V2,
    /// `version = 3`: containerd 2.x.
    V3,
}

impl Schema {
    pub fn number(self) -> i64 {
        match self {
            Schema::V2 => 2,
            Schema::V3 => 3,
        }
    }

    /// The schema a fresh config gets for containerd `major`.
    pub fn for_major(major: u8) -> Self {
        if major >= 2 {
            Schema::V3
        } else {
            Schema::V2
        }
    }
}

/// containerd's main config file as the installer found it.
#[derive(Debug)]
pub struct MainConfig {
    /// Host path.
    pub path: PathBuf,
    /// The file's text; for a file that does not exist, None (2.x) or `containerd config
    /// default` (1.x).
    pub text: Option<String>,
    pub schema: Schema,
    /// Whether the installer creates the file (it did not exist).
    pub created: bool,
}

fn parse(path: &Path, text: &str) -> Result<DocumentMut, ContainerdError> {
    text.parse::<DocumentMut>()
        .map_err(|e| ContainerdError::Parse(path.to_path_buf(), e.to_string()))
}

fn version_of(path: &Path, doc: &DocumentMut) -> Result<Schema, ContainerdError> {
    match doc.get("version").and_then(Item::as_integer) {
        Some(2) => Ok(Schema::V2),
        Some(3) => Ok(Schema::V3),
        Some(v) => Err(ContainerdError::Version(path.to_path_buf(), v)),
        None => Err(ContainerdError::Version(path.to_path_buf(), 1)),
    }
}

/// What the installer asks the host's containerd binary when there is no config file to go by.
pub trait HostContainerd {
    /// Its major version (`containerd --version`).
    fn major(&self) -> Result<u8, String>;
    /// Its built-in configuration (`containerd config default`).
    fn default_config(&self) -> Result<String, String>;
}

/// Reads containerd's main config under `root` and decides its schema. `major` is the operator's
/// `--containerd-version` (None = auto). Without a config file, a 1.x host gets one made from
/// `containerd config default`: its CRI section is what the drop-in must carry (1.x replaces
/// whole plugin sections on import, built-in defaults included).
pub fn load_main(
    root: &Path,
    host_path: &Path,
    major: Option<u8>,
    host: &dyn HostContainerd,
) -> Result<MainConfig, ContainerdError> {
    let real = under(root, host_path);
    let text = match fs::read_to_string(&real) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ContainerdError::Read(real, e)),
    };
    let schema = match &text {
        Some(t) => {
            let schema = version_of(host_path, &parse(host_path, t)?)?;
            if let Some(m) = major {
                if m < 2 && schema == Schema::V3 {
                    return Err(ContainerdError::Mismatch {
                        flag: m,
                        path: host_path.to_path_buf(),
                        schema: 3,
                        expected: "2.x",
                    });
                }
            }
            schema
        }
        None => match major {
            Some(m) => Schema::for_major(m),
            None => Schema::for_major(
                host.major()
                    .map_err(|why| ContainerdError::Unknown(host_path.to_path_buf(), why))?,
            ),
        },
    };
    let (text, created) = match text {
        Some(t) => (Some(t), false),
        None if schema == Schema::V2 => {
            let t = host
                .default_config()
                .map_err(|why| ContainerdError::NoDefaults(host_path.to_path_buf(), why))?;
            version_of(host_path, &parse(host_path, &t)?)?;
            (Some(t), true)
        }
        None => (None, true),
    };
    Ok(MainConfig {
        path: host_path.to_path_buf(),
        text,
        schema,
        created,
    })
}

/// The major version in `containerd --version`'s output ("containerd github.com/containerd/containerd
/// 1.7.24~ds1 …", "containerd containerd.io 2.1.4 …").
pub fn parse_version_output(out: &str) -> Option<u8> {
    out.split_whitespace()
        .map(|w| w.trim_start_matches('v'))
        .find_map(|w| {
            let (major, rest) = w.split_once('.')?;
            rest.chars().next().filter(char::is_ascii_digit)?;
            major.parse::<u8>().ok()
        })
}

/// The `imports` entries of a config, as written.
fn imports_of(path: &Path, doc: &DocumentMut) -> Result<Vec<String>, ContainerdError> {
    match doc.get("imports") {
        None => Ok(Vec::new()),
        Some(item) => item
            .as_array()
            .ok_or_else(|| ContainerdError::Imports(path.to_path_buf()))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ContainerdError::Imports(path.to_path_buf()))
            })
            .collect(),
    }
}

/// Host paths an `imports` list of the config at `parent` loads, resolved the way containerd does
/// (relative to the parent's directory; `*` patterns globbed), looked up under `root`. `dropin`
/// counts as existing, so a glob lists it where containerd will once it is written.
fn resolve_imports(root: &Path, parent: &Path, imports: &[String], dropin: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for imp in imports {
        let p = Path::new(imp);
        let host = if p.is_absolute() {
            p.to_path_buf()
        } else {
            parent.parent().unwrap_or(Path::new("/")).join(p)
        };
        if imp.contains('*') {
            let pattern = under(root, &host);
            if let Ok(paths) = glob::glob(&pattern.to_string_lossy()) {
                let mut found: Vec<PathBuf> = paths
                    .flatten()
                    .filter_map(|real| real.strip_prefix(root).ok().map(|r| Path::new("/").join(r)))
                    .collect();
                let covers = glob::Pattern::new(&host.to_string_lossy())
                    .is_ok_and(|pat| pat.matches_path(dropin));
                if covers && !found.iter().any(|f| f == dropin) {
                    found.push(dropin.to_path_buf());
                }
                found.sort();
                out.extend(found);
            }
        } else {
            out.push(host);
        }
    }
    out
}

/// Whether an existing `imports` entry of the config at `parent` already loads `dropin`.
fn imports_cover(parent: &Path, imports: &[String], dropin: &Path) -> bool {
    imports.iter().any(|imp| {
        let p = Path::new(imp);
        let host = if p.is_absolute() {
            p.to_path_buf()
        } else {
            parent.parent().unwrap_or(Path::new("/")).join(p)
        };
        if imp.contains('*') {
            glob::Pattern::new(&host.to_string_lossy()).is_ok_and(|pat| pat.matches_path(dropin))
        } else {
            host == dropin
        }
    })
}

/// The main config with `dropin` imported: None when it already imports it (nothing to edit).
/// A missing config becomes one holding only the schema version and the import.
pub fn with_import(main: &MainConfig, dropin: &Path) -> Result<Option<String>, ContainerdError> {
    let dropin_str = dropin.to_string_lossy().into_owned();
    if let (true, Some(text)) = (main.created, &main.text) {
        let mut doc = parse(&main.path, text)?;
        let mut arr = Array::new();
        arr.push(dropin_str);
        doc.insert("imports", value(arr));
        return Ok(Some(format!(
            "# Written by `accordion install` from `containerd config default` (containerd had no \
             config file); `accordion uninstall` removes it.\n{doc}"
        )));
    }
    let Some(text) = &main.text else {
        return Ok(Some(format!(
            "# Written by `accordion install` (containerd had no config file); `accordion uninstall` removes it.\n\
             version = {}\nimports = [{}]\n",
            main.schema.number(),
            toml_edit::Value::from(dropin_str)
        )));
    };
    let mut doc = parse(&main.path, text)?;
    let imports = imports_of(&main.path, &doc)?;
    if imports_cover(&main.path, &imports, dropin) {
        return Ok(None);
    }
    match doc.get_mut("imports").and_then(Item::as_array_mut) {
        Some(arr) => arr.push(dropin_str),
        None => {
            let mut arr = Array::new();
            arr.push(dropin_str);
            doc.insert("imports", value(arr));
        }
    }
    Ok(Some(doc.to_string()))
}

/// `text` with `dropin` taken out of its `imports` again (the key removed if that empties it):
/// what uninstall writes when containerd's config changed after the install.
pub fn without_import(path: &Path, text: &str, dropin: &Path) -> Result<String, ContainerdError> {
    let mut doc = parse(path, text)?;
    let dropin = dropin.to_string_lossy();
    let empty = match doc.get_mut("imports").and_then(Item::as_array_mut) {
        Some(arr) => {
            arr.retain(|v| v.as_str() != Some(&dropin));
            arr.is_empty()
        }
        None => false,
    };
    if empty {
        doc.remove("imports");
    }
    Ok(doc.to_string())
}

/// The runtime's table, the same in both schemas.
fn runtime_table() -> Table {
    let mut t = Table::new();
    t.insert("runtime_type", value(RUNTIME_TYPE));
    // A privileged pod must not get the host's devices inside a VM.
    t.insert("privileged_without_host_devices", value(true));
    // The pod's own settings (accordion.dev/max-memory) reach the shim in the sandbox's spec.
    let mut annotations = Array::new();
    annotations.push(POD_ANNOTATIONS);
    t.insert("pod_annotations", value(annotations));
    t
}

/// The pod annotations containerd passes to the shim (runtime/src/shim/spec.rs).
pub const POD_ANNOTATIONS: &str = "accordion.dev/*";

/// Gets or creates the table at `keys` under `t`.
fn table_at<'a>(t: &'a mut Table, keys: &[&str]) -> &'a mut Table {
    let mut cur = t;
    for k in keys {
        let item = cur.entry(k).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        if !item.is_table() {
            *item = Item::Table(Table::new());
        }
        cur = match item.as_table_mut() {
            Some(t) => t,
            None => unreachable!("made a table above"),
        };
    }
    cur
}

/// The drop-in's text for the main config `main` (files under `root`; our own drop-in at `dropin`
/// is skipped when copying the CRI section).
pub fn dropin_text(
    root: &Path,
    main: &MainConfig,
    dropin: &Path,
) -> Result<String, ContainerdError> {
    let mut doc = DocumentMut::new();
    doc.insert("version", value(main.schema.number()));
    let header;
    match main.schema {
        Schema::V3 => {
            header = "containerd 2.x merges plugin tables key by key: this holds only the runtime.";
            let plugins = table_at(
                doc.as_table_mut(),
                &["plugins", CRI_V3_RUNTIME, "containerd", "runtimes"],
            );
            plugins.insert(RUNTIME_NAME, Item::Table(runtime_table()));
        }
        Schema::V2 => {
            header = "containerd 1.x replaces a plugin's whole section with an imported one: this holds a\n\
                      # copy of the CRI section containerd used before (re-run `accordion install` after\n\
                      # editing that section) with the accordion runtime added.";
            let (cri, _from) = effective_cri_v2(root, main, dropin)?;
            let plugins = table_at(doc.as_table_mut(), &["plugins"]);
            let mut cri = cri.unwrap_or_default();
            cri.set_implicit(false);
            let runtimes = table_at(&mut cri, &["containerd", "runtimes"]);
            runtimes.insert(RUNTIME_NAME, Item::Table(runtime_table()));
            plugins.insert(CRI_V2, Item::Table(cri));
        }
    }
    Ok(format!(
        "# Written by `accordion install`; `accordion uninstall` removes it.\n# {header}\n{doc}"
    ))
}

/// The CRI section containerd 1.x would use without our drop-in: that of the last loaded file
/// defining it, with the file it came from. Errors if a file loaded after our drop-in defines it.
fn effective_cri_v2(
    root: &Path,
    main: &MainConfig,
    dropin: &Path,
) -> Result<(Option<Table>, Option<PathBuf>), ContainerdError> {
    let Some(text) = &main.text else {
        return Ok((None, None));
    };
    // containerd's loader: breadth first from the main file, each file once.
    let mut pending = vec![(main.path.clone(), text.clone())];
    let mut loaded: Vec<PathBuf> = Vec::new();
    let mut found: Option<(Table, PathBuf)> = None;
    let mut order: Vec<PathBuf> = Vec::new();
    while !pending.is_empty() {
        let (path, text) = pending.remove(0);
        if loaded.contains(&path) {
            continue;
        }
        let doc = parse(&path, &text)?;
        order.push(path.clone());
        if let Some(cri) = doc
            .get("plugins")
            .and_then(|p| p.get(CRI_V2))
            .and_then(Item::as_table)
        {
            found = Some((cri.clone(), path.clone()));
        }
        let mut imports = resolve_imports(root, &path, &imports_of(&path, &doc)?, dropin);
        // Where ours goes: appended to the main file's imports.
        if path == main.path && !imports.contains(&dropin.to_path_buf()) {
            imports.push(dropin.to_path_buf());
        }
        loaded.push(path);
        for imp in imports {
            if imp == dropin {
                pending.push((imp, String::new()));
                continue;
            }
            let real = under(root, &imp);
            match fs::read_to_string(&real) {
                Ok(t) => pending.push((imp, t)),
                // containerd fails on a missing import; so will it with or without us.
                Err(e) => return Err(ContainerdError::Read(real, e)),
            }
        }
    }
    let ours = order.iter().position(|p| p == dropin);
    if let (Some((_, from)), Some(ours)) = (&found, ours) {
        if order
            .iter()
            .position(|p| p == from)
            .is_some_and(|i| i > ours)
        {
            return Err(ContainerdError::ShadowedDropin(
                from.clone(),
                dropin.to_path_buf(),
            ));
        }
    }
    Ok(match found {
        Some((t, from)) => (Some(t), Some(from)),
        None => (None, None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DROPIN: &str = "/etc/containerd/conf.d/accordion.toml";

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("accordion-ctrd-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("etc/containerd")).unwrap();
        d
    }

    /// A host containerd of `major` whose defaults are `defaults` (Err: no binary).
    struct FakeHost(Result<u8, String>, &'static str);

    impl HostContainerd for FakeHost {
        fn major(&self) -> Result<u8, String> {
            self.0.clone()
        }
        fn default_config(&self) -> Result<String, String> {
            self.0.clone().map(|_| self.1.to_string())
        }
    }

    const NO_BINARY: FakeHost = FakeHost(Err(String::new()), "");

    fn main_of(root: &Path, text: Option<&str>) -> MainConfig {
        if let Some(t) = text {
            fs::write(root.join("etc/containerd/config.toml"), t).unwrap();
        }
        let none = FakeHost(Err("no containerd binary".into()), "");
        load_main(root, Path::new("/etc/containerd/config.toml"), None, &none).unwrap()
    }

    const V2: &str = r#"# the operator's comment
version = 2

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = true
"#;

    #[test]
    fn test_schema_follows_the_config_version_and_v1_is_refused() {
        let root = scratch("schema");
        assert_eq!(main_of(&root, Some(V2)).schema, Schema::V2);
        assert_eq!(main_of(&root, Some("version = 3\n")).schema, Schema::V3);
        fs::write(root.join("etc/containerd/config.toml"), "[plugins.cri]\n").unwrap();
        let err = load_main(
            &root,
            Path::new("/etc/containerd/config.toml"),
            None,
            &FakeHost(Ok(1), ""),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("version 1") && err.contains("config migrate"),
            "{err}"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn test_without_a_config_the_binary_or_the_flag_decides() {
        let root = scratch("noconfig");
        let p = Path::new("/etc/containerd/config.toml");
        assert_eq!(
            load_main(&root, p, None, &FakeHost(Ok(2), ""))
                .unwrap()
                .schema,
            Schema::V3
        );
        let v1 = FakeHost(
            Ok(1),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  x = 1\n",
        );
        let main = load_main(&root, p, None, &v1).unwrap();
        assert_eq!(main.schema, Schema::V2);
        assert!(main.created && main.text.as_deref().is_some_and(|t| t.contains("x = 1")));
        let edited = with_import(&main, Path::new(DROPIN)).unwrap().unwrap();
        assert!(
            edited.contains("x = 1") && edited.contains(DROPIN),
            "{edited}"
        );
        let err = load_main(&root, p, None, &NO_BINARY)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--containerd-version"), "{err}");
        // 1.x named by the flag, but its defaults cannot be had: refused with the way out.
        let err = load_main(&root, p, Some(1), &NO_BINARY)
            .unwrap_err()
            .to_string();
        assert!(err.contains("containerd config default >"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn test_flag_1_against_a_version_3_config_is_a_mismatch() {
        let root = scratch("mismatch");
        fs::write(root.join("etc/containerd/config.toml"), "version = 3\n").unwrap();
        let err = load_main(
            &root,
            Path::new("/etc/containerd/config.toml"),
            Some(1),
            &FakeHost(Ok(1), ""),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not match"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn test_version_output_of_debian_and_upstream_builds() {
        assert_eq!(
            parse_version_output(
                "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6"
            ),
            Some(1)
        );
        assert_eq!(
            parse_version_output(
                "containerd containerd.io v2.1.4 75cb2b7193e4e490e9fbdc236c0e811ccaba3376"
            ),
            Some(2)
        );
        assert_eq!(parse_version_output("garbage"), None);
    }

    #[test]
    fn test_import_is_added_keeping_comments_and_removed_again() {
        let root = scratch("import");
        let main = main_of(&root, Some(V2));
        let edited = with_import(&main, Path::new(DROPIN)).unwrap().unwrap();
        assert!(edited.contains("# the operator's comment"));
        let doc: toml::Table = edited.parse().unwrap();
        assert_eq!(doc["imports"].as_array().unwrap()[0].as_str(), Some(DROPIN));
        assert_eq!(
            doc["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"].as_str(),
            Some("registry.k8s.io/pause:3.10")
        );
        // Removing it gives the original back (the key did not exist before).
        let back = without_import(&main.path, &edited, Path::new(DROPIN)).unwrap();
        assert_eq!(back, V2);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn test_an_existing_glob_import_covering_the_dropin_needs_no_edit() {
        let root = scratch("glob");
        let text = "version = 3\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n";
        let main = main_of(&root, Some(text));
        assert_eq!(with_import(&main, Path::new(DROPIN)).unwrap(), None);
        let other = "version = 3\nimports = [\"/etc/other.toml\"]\n";
        let main = main_of(&root, Some(other));
        let edited = with_import(&main, Path::new(DROPIN)).unwrap().unwrap();
        assert!(
            edited.contains(
                "imports = [\"/etc/other.toml\", \"/etc/containerd/conf.d/accordion.toml\"]"
            ),
            "{edited}"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn test_missing_config_is_created_with_version_and_import() {
        let root = scratch("create");
        let main = load_main(
            &root,
            Path::new("/etc/containerd/config.toml"),
            Some(2),
            &NO_BINARY,
        )
        .unwrap();
        let text = with_import(&main, Path::new(DROPIN)).unwrap().unwrap();
        let doc: toml::Table = text.parse().unwrap();
        assert_eq!(doc["version"].as_integer(), Some(3));
        assert_eq!(doc["imports"].as_array().unwrap().len(), 1);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn test_v2_dropin_carries_the_hosts_cri_section_plus_the_runtime() {
        let root = scratch("v2");
        let main = main_of(&root, Some(V2));
        let text = dropin_text(&root, &main, Path::new(DROPIN)).unwrap();
        let doc: toml::Table = text.parse().unwrap();
        assert_eq!(doc["version"].as_integer(), Some(2));
        let cri = &doc["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(
            cri["sandbox_image"].as_str(),
            Some("registry.k8s.io/pause:3.10")
        );
        let runtimes = &cri["containerd"]["runtimes"];
        assert_eq!(
            runtimes["runc"]["options"]["SystemdCgroup"].as_bool(),
            Some(true)
        );
        assert_eq!(
            runtimes["accordion"]["runtime_type"].as_str(),
            Some(RUNTIME_TYPE)
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn test_v2_dropin_copies_the_cri_section_of_the_last_import_defining_it() {
        let root = scratch("v2imports");
        fs::create_dir_all(root.join("etc/containerd/conf.d")).unwrap();
        fs::write(
            root.join("etc/containerd/conf.d/10-mine.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"mine:1\"\n",
        )
        .unwrap();
        let text = format!("imports = [\"/etc/containerd/conf.d/*.toml\"]\n{V2}");
        let main = main_of(&root, Some(&text));
        let drop = dropin_text(&root, &main, Path::new(DROPIN)).unwrap();
        let doc: toml::Table = drop.parse().unwrap();
        assert_eq!(
            doc["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"].as_str(),
            Some("mine:1")
        );
        // Our own drop-in, once written, is not copied from.
        fs::write(root.join(DROPIN.trim_start_matches('/')), &drop).unwrap();
        assert_eq!(dropin_text(&root, &main, Path::new(DROPIN)).unwrap(), drop);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn test_v2_dropin_shadowed_by_a_later_file_is_refused() {
        let root = scratch("shadow");
        // conf.d/zz.toml sorts after accordion.toml in the glob: 1.x would load it last.
        fs::create_dir_all(root.join("etc/containerd/conf.d")).unwrap();
        fs::write(
            root.join("etc/containerd/conf.d/zz.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"zz:1\"\n",
        )
        .unwrap();
        fs::write(root.join(DROPIN.trim_start_matches('/')), "").unwrap();
        let text = format!("imports = [\"/etc/containerd/conf.d/*.toml\"]\n{V2}");
        let main = main_of(&root, Some(&text));
        let err = dropin_text(&root, &main, Path::new(DROPIN))
            .unwrap_err()
            .to_string();
        assert!(err.contains("zz.toml"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn test_v3_dropin_holds_only_the_runtime() {
        let root = scratch("v3");
        let main = main_of(&root, Some("version = 3\n"));
        let text = dropin_text(&root, &main, Path::new(DROPIN)).unwrap();
        let doc: toml::Table = text.parse().unwrap();
        assert_eq!(doc["version"].as_integer(), Some(3));
        let plugins = doc["plugins"].as_table().unwrap();
        assert_eq!(plugins.len(), 1);
        assert_eq!(
            plugins["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["accordion"]
                ["runtime_type"]
                .as_str(),
            Some(RUNTIME_TYPE)
        );
        // The pod's accordion.dev/ annotations reach the shim.
        assert_eq!(
            plugins["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["accordion"]
                ["pod_annotations"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>()),
            Some(vec![POD_ANNOTATIONS])
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
