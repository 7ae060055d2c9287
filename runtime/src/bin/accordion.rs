fn main() {
    // The same binary is the VMM process of `accordion run` (`__accordion-vmm`).
    accordion_runtime::vmm_process::main_if_vmm();
    std::process::exit(accordion_runtime::cli::main());
}
