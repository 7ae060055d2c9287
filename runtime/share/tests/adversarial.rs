//! The pod share against a hostile writer, natively and as root (`make adversarial-test`).
//!
//! Each case runs in a private mount namespace of its own: `main` re-executes this binary under
//! `unshare -m --propagation private` with [`CASE_ENV`] naming the case (unshare(2) in a process
//! that already has threads would move only the calling thread), on a tmpfs mounted for it. A case
//! that needs a process like virtiofsd's sandbox starts this binary once more, under
//! `unshare -m --propagation slave`, with [`ROLE_ENV`] set. Without root or mount namespaces the
//! cases print SKIPPED, and fail instead under ACCORDION_REQUIRE_KVM=1 (as CI runs them).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use accordion_share::{mounts_under, remove_dir_unless_mounted, HostBind, PodShare, Rootfs};
use nix::fcntl::{openat2, renameat2, OFlag, OpenHow, RenameFlags, ResolveFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::unistd::{symlinkat, unlinkat, UnlinkatFlags};

const CASE_ENV: &str = "ACCORDION_SHARE_TEST_CASE";
const ROOT_ENV: &str = "ACCORDION_SHARE_TEST_ROOT";
const ROLE_ENV: &str = "ACCORDION_SHARE_TEST_ROLE";
const SHARE_ENV: &str = "ACCORDION_SHARE_TEST_SHARE";
/// Mount attempts raced by the attacker (half with each kind of root filesystem).
const ITERATIONS: usize = 1000;

type Case = (&'static str, fn(&TestRoot));

const CASES: &[Case] = &[
    (
        "test_mount_container_racing_symlink_swaps_mounts_only_inside_the_pod_dir",
        race_symlink_swaps,
    ),
    (
        "test_mount_container_failing_midway_leaves_nothing_mounted",
        failing_midway,
    ),
    (
        "test_readonly_bind_keeps_its_submounts_flags_and_a_recursive_one_makes_them_readonly",
        readonly_submounts,
    ),
    (
        "test_share_view_is_readonly_but_rootfs_and_rw_volumes_are_writable",
        view_readonly_skeleton,
    ),
    (
        "test_mounts_made_after_a_sandboxed_reader_started_reach_it_private_parent",
        |t| late_mounts_reach_reader(t, false),
    ),
    (
        "test_mounts_made_after_a_sandboxed_reader_started_reach_it_shared_parent",
        |t| late_mounts_reach_reader(t, true),
    ),
    (
        "test_create_with_a_planted_symlink_refuses_and_mounts_nothing",
        planted_skeleton_symlink,
    ),
    (
        "test_state_dir_with_a_mount_under_it_is_left_in_place",
        state_dir_with_mount,
    ),
];

fn main() -> ExitCode {
    if std::env::var_os(ROLE_ENV).is_some() {
        return sandboxed_reader();
    }
    if let Some(name) = std::env::var_os(CASE_ENV) {
        let root = TestRoot::mount(PathBuf::from(
            std::env::var_os(ROOT_ENV).expect("test root"),
        ));
        let case = CASES
            .iter()
            .find(|(n, _)| name.to_str() == Some(n))
            .expect("known case");
        (case.1)(&root);
        return ExitCode::SUCCESS;
    }
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if let Some(why) = missing_prerequisite() {
        if std::env::var("ACCORDION_REQUIRE_KVM").as_deref() == Ok("1") {
            eprintln!("ACCORDION_REQUIRE_KVM=1 but {why}");
            return ExitCode::FAILURE;
        }
        println!("SKIPPED: {why}");
        return ExitCode::SUCCESS;
    }
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, _) in CASES {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let started = Instant::now();
        let root =
            std::env::temp_dir().join(format!("accordion-share-{}-{ran}", std::process::id()));
        fs::create_dir(&root).expect("test root");
        let out = Command::new("unshare")
            .args(["-m", "--propagation", "private", "--"])
            .arg(std::env::current_exe().expect("own path"))
            .env(CASE_ENV, name)
            .env(ROOT_ENV, &root)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run unshare");
        let _ = fs::remove_dir(&root);
        let secs = started.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            println!("test {name} ... ok ({secs:.1} s)");
            for line in stdout.lines() {
                println!("    {line}");
            }
        } else {
            println!(
                "test {name} ... FAILED ({}, {secs:.1} s)\n{stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            failed.push(*name);
        }
    }
    println!(
        "\nadversarial: {} passed, {} failed",
        ran - failed.len(),
        failed.len()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Why the cases cannot run here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (the share's mounts need CAP_SYS_ADMIN)".into());
    }
    match Command::new("unshare")
        .args(["-m", "--propagation", "private", "true"])
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "cannot make a mount namespace: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run unshare(1): {e}")),
    }
}

/// A case's scratch tree, on a tmpfs of its own (gone with the case's mount namespace):
/// `pod/` (a pod's state directory), `outside/` (what must never change: a file and a
/// directory), `src/` (bind sources: `vol/` with a file, the file `hosts`) and `rootfs/` (a
/// bundle root filesystem).
struct TestRoot {
    /// The case's tmpfs; the tree is in `t/` (`root`), leaving room beside it.
    base: PathBuf,
    root: PathBuf,
    pod: PathBuf,
    outside: PathBuf,
}

impl TestRoot {
    fn mount(base: PathBuf) -> Self {
        mount(
            Some("tmpfs"),
            &base,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("tmpfs for the case");
        let root = base.join("t");
        let t = TestRoot {
            pod: root.join("pod"),
            outside: root.join("outside"),
            root,
            base,
        };
        fs::create_dir_all(&t.pod).expect("pod dir");
        fs::create_dir_all(t.outside.join("dir")).expect("outside dir");
        fs::write(t.outside.join("victim"), "precious").expect("victim");
        fs::write(t.outside.join("dir/keep"), "keep").expect("keep");
        fs::create_dir_all(t.root.join("src/vol")).expect("vol");
        fs::write(t.root.join("src/vol/file"), "volume").expect("vol file");
        fs::write(t.root.join("src/hosts"), "127.0.0.1 localhost\n").expect("hosts");
        fs::create_dir_all(t.root.join("rootfs")).expect("rootfs");
        fs::write(t.root.join("rootfs/marker"), "rootfs").expect("marker");
        t
    }

    fn mounts(&self) -> PathBuf {
        self.pod.join("mounts")
    }

    /// The binds of the cases: a read-write directory, a file, a read-only directory.
    fn binds(&self) -> Vec<HostBind> {
        vec![
            HostBind {
                source: self.root.join("src/vol"),
                target: "mounts/0".into(),
                is_dir: true,
                readonly: false,
                recursive_readonly: false,
            },
            HostBind {
                source: self.root.join("src/hosts"),
                target: "mounts/1".into(),
                is_dir: false,
                readonly: false,
                recursive_readonly: false,
            },
            HostBind {
                source: self.root.join("src/vol"),
                target: "mounts/2".into(),
                is_dir: true,
                readonly: true,
                recursive_readonly: false,
            },
        ]
    }

    /// Every name and file content under `outside/`.
    fn outside_snapshot(&self) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.outside.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).expect("read outside") {
                let path = entry.expect("entry").path();
                let meta = fs::symlink_metadata(&path).expect("stat outside");
                let content = if meta.is_dir() {
                    stack.push(path.clone());
                    "<dir>".to_string()
                } else {
                    fs::read_to_string(&path).unwrap_or_else(|e| format!("<{e}>"))
                };
                out.insert(path, content);
            }
        }
        out
    }

    /// Removes everything in `pod/mounts/` (after unmounting it), whatever names the attacker
    /// left there.
    fn reset_containers(&self) {
        for entry in fs::read_dir(self.mounts()).expect("read mounts") {
            let path = entry.expect("entry").path();
            if fs::symlink_metadata(&path).expect("stat").is_dir() {
                accordion_share::unmount_all_under(&path);
                assert!(
                    remove_dir_unless_mounted(&path),
                    "{} stayed",
                    path.display()
                );
            } else {
                fs::remove_file(&path).expect("remove");
            }
        }
    }
}

/// Mount points (from mountinfo) below `dir`, not counting `dir` itself.
fn mounted_below(dir: &Path) -> Vec<PathBuf> {
    mounts_under(dir)
        .expect("mountinfo")
        .into_iter()
        .filter(|p| p != dir)
        .collect()
}

/// Every mount point of this namespace.
fn all_mounts() -> BTreeSet<PathBuf> {
    mounts_under(Path::new("/"))
        .expect("mountinfo")
        .into_iter()
        .collect()
}

/// A containerd-like root filesystem mount: a tmpfs with a marker file.
fn tmpfs_rootfs(path: &Path) -> Result<(), String> {
    mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| format!("tmpfs: {e}"))?;
    fs::write(path.join("marker"), "rootfs").map_err(|e| format!("marker: {e}"))
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// Creates file `path`; returns the errno when that fails.
fn create(path: &Path) -> Option<i32> {
    errno_of(fs::write(path, "x"))
}

/// A thread that swaps every component the shim resolves for a symlink to `outside/` while
/// `mount_container` runs: a name that does not exist yet gets a symlink planted (so the shim's
/// mkdir or O_EXCL create meets it), one that exists is exchanged (RENAME_EXCHANGE) with a
/// sibling symlink and back. It works through directory descriptors without following symlinks,
/// so its own writes never land outside either.
struct Attacker {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

/// (parent relative to `pod/mounts`, name, symlink target).
fn attack_targets(t: &TestRoot) -> Vec<(&'static str, &'static str, PathBuf)> {
    let dir = t.outside.join("dir");
    vec![
        ("", "c", dir.clone()),
        ("c", "rootfs", dir.clone()),
        ("c", "mounts", dir.clone()),
        ("c/mounts", "0", dir.clone()),
        ("c/mounts", "1", t.outside.join("victim")),
        ("c/mounts", "2", dir),
    ]
}

impl Attacker {
    fn start(t: &TestRoot, seed: u64, plant_first: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(Barrier::new(2));
        let mounts = t.mounts();
        let targets = attack_targets(t);
        let (stop2, ready2) = (Arc::clone(&stop), Arc::clone(&ready));
        let thread = std::thread::spawn(move || {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut moves = 0;
            if plant_first {
                // The container's directory is a symlink before the shim starts.
                let (parent, name, to) = &targets[0];
                moves += u64::from(attack(&mounts, parent, name, to, 0));
            }
            ready2.wait();
            while !stop2.load(Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let (parent, name, to) = &targets[(rng % targets.len() as u64) as usize];
                moves += u64::from(attack(&mounts, parent, name, to, (rng >> 8) % 64));
            }
            moves
        });
        ready.wait();
        Attacker { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("attacker")
    }
}

/// One swap of `mounts/<parent>/<name>`; returns whether it touched anything.
fn attack(mounts: &Path, parent: &str, name: &str, to: &Path, hold: u64) -> bool {
    let Ok(base) = nix::fcntl::open(mounts, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())
    else {
        return false;
    };
    let dir = if parent.is_empty() {
        base
    } else {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        match openat2(&base, parent, how) {
            Ok(d) => d,
            Err(_) => return false,
        }
    };
    let evil = format!("{name}.evil");
    let spin = || {
        for _ in 0..hold {
            std::hint::spin_loop();
        }
    };
    let exists = nix::sys::stat::fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW);
    match exists {
        Err(nix::errno::Errno::ENOENT) => {
            if symlinkat(to, &dir, name).is_err() {
                return false;
            }
            spin();
            // Mostly taken back, so the shim gets through now and then.
            if hold % 4 != 0 {
                let _ = unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir);
            }
            true
        }
        Ok(st) if st.st_mode & libc::S_IFMT != libc::S_IFLNK => {
            let _ = symlinkat(to, &dir, evil.as_str());
            let swapped = renameat2(
                &dir,
                name,
                &dir,
                evil.as_str(),
                RenameFlags::RENAME_EXCHANGE,
            )
            .is_ok();
            spin();
            if swapped && hold % 8 != 0 {
                let _ = renameat2(
                    &dir,
                    name,
                    &dir,
                    evil.as_str(),
                    RenameFlags::RENAME_EXCHANGE,
                );
            }
            swapped
        }
        _ => false,
    }
}

fn race_symlink_swaps(t: &TestRoot) {
    let share = PodShare::create(&t.pod).expect("create the share");
    let before = all_mounts();
    let outside = t.outside_snapshot();
    let binds = t.binds();
    let rootfs_dir = t.root.join("rootfs");
    let (mut mounted, mut displaced, mut refused, mut moves) = (0, 0, 0, 0);
    let mut reasons = BTreeMap::<String, usize>::new();
    for i in 0..ITERATIONS {
        // One in ten without an attacker (the mounts must work), one in ten planted first.
        let attacker = (i % 10 != 5).then(|| Attacker::start(t, i as u64 + 1, i % 10 == 0));
        let rootfs = if i % 2 == 0 {
            Rootfs::Bind(&rootfs_dir)
        } else {
            Rootfs::Mount(&tmpfs_rootfs)
        };
        let result = share.mount_container("c", rootfs, &binds);
        moves += attacker.map_or(0, Attacker::stop);

        for point in all_mounts().difference(&before) {
            assert!(
                point.starts_with(&t.pod),
                "iteration {i}: a mount outside the pod's directory: {} ({result:?})",
                point.display()
            );
        }
        assert_eq!(
            t.outside_snapshot(),
            outside,
            "iteration {i}: outside/ changed ({result:?})"
        );
        assert_eq!(
            mounted_below(&t.pod.join("stage")),
            Vec::<PathBuf>::new(),
            "iteration {i}: a staged mount left"
        );
        let inside = mounted_below(&t.mounts());
        match result {
            Ok(()) => {
                mounted += 1;
                assert_eq!(
                    inside.len(),
                    1 + binds.len(),
                    "iteration {i}: mounted, but {inside:?}"
                );
                let c = t.mounts().join("c");
                let expected: BTreeSet<PathBuf> = ["rootfs", "mounts/0", "mounts/1", "mounts/2"]
                    .iter()
                    .map(|p| c.join(p))
                    .collect();
                if inside.iter().cloned().collect::<BTreeSet<_>>() != expected {
                    // The attacker renamed a directory while the shim held it: the mounts went
                    // where the directory went (still in the pod), not where a symlink pointed.
                    displaced += 1;
                }
            }
            Err(e) => {
                refused += 1;
                let chain = error_chain(&e);
                assert!(
                    chain.contains(&*t.pod.to_string_lossy()),
                    "iteration {i}: the error names no path of the pod: {chain}"
                );
                assert!(
                    inside.is_empty(),
                    "iteration {i}: refused ({chain}) but left {inside:?}"
                );
                *reasons.entry(reason(&chain, t)).or_default() += 1;
            }
        }
        t.reset_containers();
    }
    println!(
        "{ITERATIONS} races, {moves} attacker moves: {mounted} mounted entirely inside \
         ({displaced} of them in a directory the attacker had renamed), {refused} refused with \
         nothing left mounted"
    );
    for (why, n) in &reasons {
        println!("  {n:4} × {why}");
    }
    assert!(
        mounted > 0 && refused > 0,
        "{mounted} mounted, {refused} refused"
    );
    share.unmount_all();
    assert!(remove_dir_unless_mounted(&t.pod));
}

/// The error without the test's paths, to count kinds of refusal.
fn reason(chain: &str, t: &TestRoot) -> String {
    chain.replace(&*t.pod.to_string_lossy(), "<pod>")
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn failing_midway(t: &TestRoot) {
    let share = PodShare::create(&t.pod).expect("create the share");
    let mut binds = t.binds();
    binds.push(HostBind {
        source: t.root.join("src/missing"),
        target: "mounts/3".into(),
        is_dir: true,
        readonly: false,
        recursive_readonly: false,
    });
    let err = share
        .mount_container("c", Rootfs::Mount(&tmpfs_rootfs), &binds)
        .expect_err("a missing source");
    let chain = error_chain(&err);
    assert!(chain.contains("src/missing"), "{chain}");
    // The root filesystem and the three binds made before were unmounted again.
    assert_eq!(mounted_below(&t.mounts()), Vec::<PathBuf>::new());
    assert_eq!(mounted_below(&t.pod.join("share")), Vec::<PathBuf>::new());
    assert_eq!(mounted_below(&t.pod.join("stage")), Vec::<PathBuf>::new());
    assert!(share.remove_container("c"));
    assert!(!share.container_dir("c").exists());
    // A root filesystem mount that mounts nothing is an error too, not an empty rootfs.
    let err = share
        .mount_container("d", Rootfs::Mount(&|_| Ok(())), &[])
        .expect_err("nothing mounted");
    assert!(error_chain(&err).contains("left nothing mounted"), "{err}");
    assert!(share.remove_container("d"));
}

fn readonly_submounts(t: &TestRoot) {
    let share = PodShare::create(&t.pod).expect("create the share");
    let src = t.root.join("src/vol");
    fs::create_dir(src.join("sub")).expect("sub");
    mount(
        Some("tmpfs"),
        &src.join("sub"),
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("submount");
    fs::write(src.join("sub/file"), "sub").expect("sub file");
    let binds = [
        HostBind {
            source: src.clone(),
            target: "mounts/0".into(),
            is_dir: true,
            readonly: true,
            recursive_readonly: false,
        },
        HostBind {
            source: src.clone(),
            target: "mounts/1".into(),
            is_dir: true,
            readonly: false,
            recursive_readonly: false,
        },
        HostBind {
            source: src.clone(),
            target: "mounts/2".into(),
            is_dir: true,
            readonly: true,
            recursive_readonly: true,
        },
    ];
    share
        .mount_container("c", Rootfs::Bind(&t.root.join("rootfs")), &binds)
        .expect("mount");
    let host = share.container_dir("c");
    let view = t.pod.join("share/c");
    for base in [&host, &view] {
        for bind in ["mounts/0", "mounts/2"] {
            assert_eq!(
                fs::read_to_string(base.join(bind).join("sub/file")).expect("read"),
                "sub"
            );
            assert_eq!(create(&base.join(bind).join("new")), Some(libc::EROFS));
        }
        // `ro` makes the bind read-only, not its submounts (as runc does)...
        assert_eq!(
            create(&base.join("mounts/0/sub/new-0")),
            None,
            "the submount of a (non-recursive) read-only bind is read-only under {}",
            base.display()
        );
        // ... `rro` makes them read-only too.
        assert_eq!(
            create(&base.join("mounts/2/sub/new")),
            Some(libc::EROFS),
            "the submount of a recursively read-only bind is writable under {}",
            base.display()
        );
        fs::remove_file(base.join("mounts/0/sub/new-0")).expect("remove");
    }
    // Where the guest must bind them itself: below the bind, with their own flags.
    assert_eq!(
        accordion_share::submounts(&host.join("mounts/0")).expect("submounts"),
        vec![(PathBuf::from("sub"), false)]
    );
    assert_eq!(
        accordion_share::submounts(&host.join("mounts/2")).expect("submounts"),
        vec![(PathBuf::from("sub"), true)]
    );
    // The read-write bind of the same source is writable, submount included.
    assert_eq!(create(&view.join("mounts/1/sub/new")), None);
    // A mount made under the source later does not reach the binds: it cannot bring a writable
    // submount into the read-only one.
    fs::create_dir(src.join("late")).expect("late");
    mount(
        Some("tmpfs"),
        &src.join("late"),
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("late mount");
    assert_eq!(
        mounted_below(&host.join("mounts/0/late")),
        Vec::<PathBuf>::new()
    );
    assert_eq!(create(&host.join("mounts/0/late/new")), Some(libc::EROFS));
    assert!(share.remove_container("c"));
}

fn view_readonly_skeleton(t: &TestRoot) {
    let share = PodShare::create(&t.pod).expect("create the share");
    share
        .mount_container("c", Rootfs::Mount(&tmpfs_rootfs), &t.binds())
        .expect("mount");
    let view = t.pod.join("share/c");
    // The skeleton: nothing can be created, renamed, replaced or removed.
    assert_eq!(errno_of(fs::create_dir(view.join("x"))), Some(libc::EROFS));
    assert_eq!(create(&view.join("f")), Some(libc::EROFS));
    assert_eq!(
        errno_of(symlink(&t.outside, view.join("mounts/3"))),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno_of(fs::rename(view.join("mounts"), view.join("m"))),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno_of(fs::remove_dir(t.pod.join("share").join("c"))),
        Some(libc::EROFS)
    );
    // What the containers own keeps its flags: the rootfs and the read-write volume and file
    // are writable, the read-only volume is not.
    assert_eq!(
        fs::read_to_string(view.join("rootfs/marker")).expect("rootfs"),
        "rootfs"
    );
    assert_eq!(create(&view.join("rootfs/new")), None);
    assert_eq!(create(&view.join("mounts/0/new")), None);
    assert_eq!(
        errno_of(
            fs::OpenOptions::new()
                .append(true)
                .open(view.join("mounts/1"))
        ),
        None
    );
    assert_eq!(create(&view.join("mounts/2/new2")), Some(libc::EROFS));
    // mountinfo: mounts/ is shared, share/ is a read-only slave of it.
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let line = |point: &Path| {
        info.lines()
            .find(|l| l.split(' ').nth(4) == point.to_str())
            .unwrap_or_default()
            .to_string()
    };
    let mounts = line(&t.mounts());
    let shared = mounts
        .split(' ')
        .find_map(|f| f.strip_prefix("shared:"))
        .expect("mounts/ is shared")
        .to_string();
    let view_line = line(&t.pod.join("share"));
    assert!(
        view_line
            .split(' ')
            .nth(5)
            .is_some_and(|o| o.starts_with("ro")),
        "{view_line}"
    );
    assert!(
        view_line.contains(&format!("master:{shared}")),
        "share/ is not a slave of mounts/: {view_line} / {mounts}"
    );
    assert!(share.remove_container("c"));
    assert_eq!(mounted_below(&t.pod.join("share")), Vec::<PathBuf>::new());
}

/// virtiofsd's sandbox, as a process: started from the case's namespace under
/// `unshare -m --propagation slave`, it clones the share recursively onto itself, pivots into it
/// and drops the old root (virtiofsd's setup_mounts), then answers the case on stdin/stdout.
fn sandboxed_reader() -> ExitCode {
    let share = PathBuf::from(std::env::var_os(SHARE_ENV).expect("share path"));
    if let Err(e) = enter(&share) {
        println!("sandbox: {e}");
        return ExitCode::FAILURE;
    }
    println!("ready");
    for line in std::io::stdin().lines() {
        let problems = match line.expect("stdin").as_str() {
            "check" => reader_sees_container(),
            "gone" => reader_sees_no_container(),
            other => vec![format!("unknown request {other}")],
        };
        if problems.is_empty() {
            println!("ok");
        } else {
            println!("{}", problems.join("; "));
        }
    }
    ExitCode::SUCCESS
}

fn enter(share: &Path) -> Result<(), String> {
    let path =
        std::ffi::CString::new(share.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let flags =
        libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: open_tree reads the NUL-terminated path and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
    if fd < 0 {
        return Err(format!("open_tree: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let root: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) };
    // SAFETY: move_mount reads the empty source path and the target path; it writes nothing of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            root.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(format!("move_mount: {}", std::io::Error::last_os_error()));
    }
    let old = nix::fcntl::open("/", OFlag::O_DIRECTORY | OFlag::O_RDONLY, Mode::empty())
        .map_err(|e| format!("open /: {e}"))?;
    nix::unistd::fchdir(root.as_fd()).map_err(|e| format!("fchdir: {e}"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    nix::unistd::fchdir(old.as_fd()).map_err(|e| format!("fchdir old: {e}"))?;
    mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("slave old root: {e}"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("umount old root: {e}"))?;
    nix::unistd::fchdir(root.as_fd()).map_err(|e| format!("fchdir new: {e}"))
}

fn reader_sees_container() -> Vec<String> {
    let mut problems = Vec::new();
    let mut expect = |what: &str, ok: bool| {
        if !ok {
            problems.push(what.to_string());
        }
    };
    expect(
        "no rootfs",
        fs::read_to_string("/c/rootfs/marker").is_ok_and(|s| s == "rootfs"),
    );
    expect(
        "no volume",
        fs::read_to_string("/c/mounts/0/file").is_ok_and(|s| s == "volume"),
    );
    expect(
        "skeleton writable",
        errno_of(fs::create_dir("/c/x")) == Some(libc::EROFS),
    );
    expect(
        "rootfs read-only",
        create(Path::new("/c/rootfs/new")).is_none(),
    );
    expect(
        "rw volume read-only",
        create(Path::new("/c/mounts/0/new")).is_none(),
    );
    expect(
        "ro volume writable",
        create(Path::new("/c/mounts/2/new")) == Some(libc::EROFS),
    );
    problems
}

fn reader_sees_no_container() -> Vec<String> {
    match fs::metadata("/c/rootfs/marker") {
        Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
        other => vec![format!("the rootfs is still there: {other:?}")],
    }
}

fn late_mounts_reach_reader(t: &TestRoot, shared_parent: bool) {
    let peer = t.base.join("peer");
    if shared_parent {
        // As under systemd: the state directory's mount is shared, with a peer elsewhere (another
        // namespace's copy, here a bind in this one).
        mount(
            Some(&t.root),
            &t.root,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind the tree onto itself");
        mount(
            None::<&str>,
            &t.root,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .expect("make shared");
        fs::create_dir(&peer).expect("peer dir");
        mount(
            Some(&t.root),
            &peer,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("peer bind");
    }
    let share = PodShare::create(&t.pod).expect("create the share");
    let mut reader = Command::new("unshare")
        .args(["-m", "--propagation", "slave", "--"])
        .arg(std::env::current_exe().expect("own path"))
        .env(ROLE_ENV, "reader")
        .env(SHARE_ENV, t.pod.join("share"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the reader");
    let mut to = reader.stdin.take().expect("stdin");
    let mut from = BufReader::new(reader.stdout.take().expect("stdout")).lines();
    let hello = from.next().expect("a greeting").expect("read");
    assert_eq!(hello, "ready", "the sandboxed reader did not start");
    let mut ask = |what: &str| {
        writeln!(to, "{what}").expect("ask");
        from.next().expect("an answer").expect("read")
    };
    // Its namespace was set up before anything was mounted in the share.
    assert_eq!(ask("gone"), "ok");
    share
        .mount_container("c", Rootfs::Mount(&tmpfs_rootfs), &t.binds())
        .expect("mount");
    assert_eq!(ask("check"), "ok");
    if shared_parent {
        for dir in ["pod/mounts", "pod/share"] {
            assert_eq!(
                mounted_below(&peer.join(dir)),
                Vec::<PathBuf>::new(),
                "container mounts reached the state directory's peer group"
            );
        }
    }
    assert!(share.remove_container("c"));
    assert_eq!(ask("gone"), "ok");
    drop(to);
    let status = reader.wait().expect("reader");
    assert!(status.success(), "reader: {status}");
}

fn planted_skeleton_symlink(t: &TestRoot) {
    let before = all_mounts();
    let before_count = mounts_under(Path::new("/")).expect("mountinfo").len();
    let outside = t.outside_snapshot();
    symlink(t.outside.join("dir"), t.pod.join("mounts")).expect("plant");
    let err = PodShare::create(&t.pod).expect_err("a symlink in the skeleton");
    assert!(error_chain(&err).contains("already exists"), "{err}");
    assert_eq!(all_mounts(), before);
    assert_eq!(t.outside_snapshot(), outside);

    // A container directory that exists already (here with a symlink to outside/ in it) is
    // refused, and removing it removes the symlink, not what it points to.
    fs::remove_file(t.pod.join("mounts")).expect("unplant");
    let share = PodShare::create(&t.pod).expect("create the share");
    fs::create_dir(share.container_dir("c")).expect("c");
    symlink(
        t.outside.join("dir"),
        share.container_dir("c").join("mounts"),
    )
    .expect("plant");
    let err = share
        .mount_container("c", Rootfs::Bind(&t.root.join("rootfs")), &t.binds())
        .expect_err("the container's directory exists");
    assert!(error_chain(&err).contains("already exists"), "{err}");
    let count = || mounts_under(Path::new("/")).expect("mountinfo").len();
    assert_eq!(
        count(),
        before_count + 4,
        "mounts/, share/ (two), stage/ and no other"
    );
    assert!(share.remove_container("c"));
    assert_eq!(t.outside_snapshot(), outside);
}

fn state_dir_with_mount(t: &TestRoot) {
    let dir = t.root.join("state");
    fs::create_dir_all(dir.join("sub")).expect("state");
    fs::write(dir.join("file"), "f").expect("file");
    mount(
        Some("tmpfs"),
        &dir.join("sub"),
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount");
    fs::write(dir.join("sub/keep"), "k").expect("keep");
    assert!(!remove_dir_unless_mounted(&dir));
    assert_eq!(fs::read_to_string(dir.join("sub/keep")).expect("kept"), "k");
    assert!(dir.join("file").exists());
    umount2(&dir.join("sub"), MntFlags::empty()).expect("umount");
    assert!(remove_dir_unless_mounted(&dir));
    assert!(!dir.exists());
}
