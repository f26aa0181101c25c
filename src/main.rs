//! Entry point: everything lives in the library so the tests and the hidden daemons share it.

fn main() -> std::process::ExitCode {
    rbee::run(std::env::args_os())
}
