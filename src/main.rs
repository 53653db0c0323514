fn main() {
    hyperdas::threads::settle();
    hyperdas::alloc::tune();
    std::process::exit(hyperdas::cli::main());
}
