fn main() {
    std::process::exit(hyperdas::cli::main());
}
