fn main() -> std::process::ExitCode {
    postbackd::cli::main()
}
