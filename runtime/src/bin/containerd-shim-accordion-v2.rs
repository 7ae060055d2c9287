fn main() {
    accordion_runtime::shim::main();
}
