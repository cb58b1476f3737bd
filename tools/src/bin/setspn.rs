//! `setspn`: Windows setspn's flags and output, against an AD (Samba or Windows) directory.

use std::process::ExitCode;

fn main() -> ExitCode {
    vmgate_tools::exit::code(vmgate_tools::exit::USAGE)
}
