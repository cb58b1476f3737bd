//! `setspn`: Windows setspn's flags and output, against an AD (Samba or Windows) directory.
//!
//! The command line is Windows setspn's (see `setspn -?` and [`vmgate_tools::spn`]); the
//! directory is named by `--ldap-url` etc. or the `VMGATE_LDAP_*` variables
//! ([`vmgate_tools::conn`]).

use std::process::ExitCode;

use clap::Parser;
use vmgate_tools::conn::ConnArgs;
use vmgate_tools::exit;
use vmgate_tools::spn::{self, SETSPN_USAGE, SetspnCommand};

/// The connection options of setspn, parsed by clap (with the `VMGATE_LDAP_*` variables).
#[derive(Debug, Parser)]
#[command(name = "setspn", disable_help_flag = true)]
struct ConnOptions {
    #[command(flatten)]
    conn: ConnArgs,
}

fn main() -> ExitCode {
    // setspn's flags are Windows setspn's (`-Q` is a query), so its log level comes from
    // RUST_LOG only.
    vmgate_control::logging::init(
        "setspn",
        tracing::level_filters::LevelFilter::WARN,
        vmgate_control::logging::LogArgs::default(),
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    match spn::parse_setspn_args(&args) {
        Ok(SetspnCommand::Help) => {
            print!("{SETSPN_USAGE}");
            exit::code(exit::OK)
        }
        Ok(SetspnCommand::Run { request, conn_args }) => {
            let argv = std::iter::once("setspn".to_owned()).chain(conn_args);
            match ConnOptions::try_parse_from(argv) {
                Ok(options) => {
                    exit::code(spn::run_request("setspn", &options.conn, &request, false))
                }
                Err(e) => {
                    eprint!("{}", e.render());
                    exit::code(exit::USAGE)
                }
            }
        }
        Err(e) => {
            eprintln!("setspn: {e}");
            eprint!("{SETSPN_USAGE}");
            exit::code(exit::USAGE)
        }
    }
}
