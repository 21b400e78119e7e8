//! The `dovepush-receiver` binary: everything is in the library's `cli` module.

fn main() -> std::process::ExitCode {
    dovepush_receiver::cli::main()
}
