#[global_allocator]
static ALLOC: hyperdas::alloc::Counting = hyperdas::alloc::Counting;

fn main() {
    hyperdas::threads::settle();
    hyperdas::alloc::tune();
    std::process::exit(hyperdas::cli::main());
}
