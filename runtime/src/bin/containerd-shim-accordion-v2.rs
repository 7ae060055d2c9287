fn main() {
    // The same binary is the pod's VMM process (`__accordion-vmm`), which the shim starts.
    accordion_runtime::vmm_process::main_if_vmm();
    accordion_runtime::shim::main();
}
