fn main() {
    hyperdas::alloc::tune();
    std::process::exit(hyperdas::cli::main());
}
