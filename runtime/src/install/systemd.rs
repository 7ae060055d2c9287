//! Restarting containerd through systemd's D-Bus API on the host's system bus, as `systemctl
//! restart containerd` does, but from an installer container that has the host's root mounted and
//! no systemctl.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zbus::blocking::{connection, Connection};
use zbus::zvariant::{OwnedObjectPath, OwnedValue};

const SYSTEMD: &str = "org.freedesktop.systemd1";
const SYSTEMD_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";

/// Errors restarting a unit.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error(
        "No D-Bus system bus at {0}: is the host running systemd? Use --restart none and restart \
         containerd yourself"
    )]
    NoBus(PathBuf),
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
    #[error("{unit} did not come back active within {secs} s (state {state})")]
    NotActive {
        unit: String,
        secs: u64,
        state: String,
    },
}

/// The system bus socket under `root`.
pub fn bus_socket(root: &Path) -> PathBuf {
    super::manifest::under(root, Path::new("/run/dbus/system_bus_socket"))
}

/// Restarts `unit` and waits until systemd reports it active again.
pub fn restart(root: &Path, unit: &str, timeout: Duration) -> Result<(), SystemdError> {
    let socket = bus_socket(root);
    if !socket.exists() {
        return Err(SystemdError::NoBus(socket));
    }
    let conn: Connection =
        connection::Builder::address(format!("unix:path={}", socket.display()).as_str())?
            .build()?;
    let job: OwnedObjectPath = conn
        .call_method(
            Some(SYSTEMD),
            SYSTEMD_PATH,
            Some(MANAGER),
            "RestartUnit",
            &(unit, "replace"),
        )?
        .body()
        .deserialize()?;
    let deadline = Instant::now() + timeout;
    // The job object exists until the restart finished (successfully or not).
    while Instant::now() < deadline
        && property(&conn, job.as_str(), "org.freedesktop.systemd1.Job", "State").is_ok()
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let unit_path: OwnedObjectPath = conn
        .call_method(
            Some(SYSTEMD),
            SYSTEMD_PATH,
            Some(MANAGER),
            "GetUnit",
            &(unit,),
        )?
        .body()
        .deserialize()?;
    let mut state = String::new();
    while Instant::now() < deadline {
        state = property(
            &conn,
            unit_path.as_str(),
            "org.freedesktop.systemd1.Unit",
            "ActiveState",
        )?;
        if state == "active" {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(SystemdError::NotActive {
        unit: unit.to_string(),
        secs: timeout.as_secs(),
        state,
    })
}

fn property(
    conn: &Connection,
    path: &str,
    iface: &str,
    name: &str,
) -> Result<String, SystemdError> {
    let v: OwnedValue = conn
        .call_method(Some(SYSTEMD), path, Some(PROPERTIES), "Get", &(iface, name))?
        .body()
        .deserialize()?;
    Ok(String::try_from(v).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_no_bus_is_a_clear_error_naming_the_socket_and_the_alternative() {
        let root = std::env::temp_dir().join(format!("accordion-nobus-{}", std::process::id()));
        let err = restart(&root, "containerd.service", Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("run/dbus/system_bus_socket"), "{err}");
        assert!(err.contains("--restart none"), "{err}");
    }
}
