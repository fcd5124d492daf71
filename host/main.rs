//! The `tessera` command line (the code is in `cli/`).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
