//! `accordion install` / `accordion uninstall` (the work is in crate::install).

use crate::install::{self, InstallArgs, UninstallArgs};

pub fn run(args: InstallArgs) -> i32 {
    if args.check {
        return match install::check(&args.root) {
            Ok(()) => {
                println!("accordion install: installed under {}", args.root.display());
                0
            }
            Err(why) => {
                eprintln!("accordion install --check: {why}");
                1
            }
        };
    }
    if let Err(e) = install::install(&args) {
        eprintln!("accordion install: {}", crate::error_chain(&e));
        return 1;
    }
    if !args.wait {
        return 0;
    }
    println!("accordion install: installed; waiting for SIGTERM");
    match install::wait_for_signal() {
        Ok(sig) => println!("accordion install: {sig}"),
        Err(e) => {
            eprintln!("accordion install: {e}");
            return 1;
        }
    }
    if args.uninstall_on_exit {
        return uninstall(UninstallArgs {
            root: args.root,
            restart: args.restart,
        });
    }
    0
}

pub fn uninstall(args: UninstallArgs) -> i32 {
    match install::uninstall(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("accordion uninstall: {}", crate::error_chain(&e));
            1
        }
    }
}
