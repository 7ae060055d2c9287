fn main() {
    std::process::exit(accordion_runtime::cli::main());
}
