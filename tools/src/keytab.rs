//! `vmgate host keytab refresh`: a new random password for this host's computer account, set
//! the way `adcli update` sets it, and the keytab rewritten with the new keys (see
//! [`vmgate_auth::krb::refresh`]). The fix vmgate prints for a stale or incomplete keytab.
//!
//! ```text
//! vmgate host keytab refresh [--keytab FILE] [--account NAME$] [--realm REALM] [--reset]
//!                            [directory connection flags] [--json]
//! ```
//!
//! Runs on the host whose keytab it is (root: the keytab is 0600). The keytab defaults to the
//! system's (`/etc/krb5.keytab`, as libkrb5 names it), the account to the computer account in
//! it that matches the host name. The directory connection (any user who may read the account;
//! the DC found in DNS when no URL is given) reads the account's SPNs, encryption types and key
//! version. `--reset`: when the keytab's key no longer works (the password was changed
//! elsewhere), set the new password over LDAP instead, which needs a user allowed to reset it
//! (a domain administrator's ticket, or `--bind-user`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use vmgate_auth::krb::refresh::{self, RefreshRequest};

use crate::conn::ConnArgs;
use crate::exit;
use crate::output;

/// `vmgate host keytab ...`
#[derive(Debug, Subcommand)]
pub enum KeytabCommand {
    /// Set a new random password for the host's computer account (kpasswd, as `adcli update`)
    /// and rewrite the keytab with its keys for the account and every SPN; the old key
    /// version is kept.
    Refresh(RefreshArgs),
}

/// `vmgate host keytab refresh` arguments.
#[derive(Debug, Args)]
pub struct RefreshArgs {
    /// The keytab (default: the system's, /etc/krb5.keytab).
    #[arg(long, value_name = "FILE")]
    pub keytab: Option<PathBuf>,
    /// The computer account (`HV1$`; default: the one in the keytab matching the host name).
    #[arg(long, value_name = "NAME$")]
    pub account: Option<String>,
    /// The realm (default: the keytab entry's).
    #[arg(long, value_name = "REALM")]
    pub realm: Option<String>,
    /// When the keytab's key no longer works, reset the password over LDAP (needs the right
    /// to reset the account's password).
    #[arg(long)]
    pub reset: bool,
    /// Directory connection.
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Runs `vmgate host keytab ...`.
pub fn run(cmd: KeytabCommand, json: bool) -> ExitCode {
    match cmd {
        KeytabCommand::Refresh(args) => exit::code(refresh_args(&args, json)),
    }
}

fn fail(
    json: bool,
    err: &dyn std::error::Error,
    code: u8,
    d: Option<&vmgate_auth::Diagnosis>,
) -> u8 {
    if json {
        println!("{}", output::error_json(err, code, d));
    } else {
        eprint!(
            "{}",
            output::error_report("vmgate host keytab refresh", err, d)
        );
    }
    code
}

/// `vmgate host keytab refresh`; returns the exit code.
pub fn refresh_args(args: &RefreshArgs, json: bool) -> u8 {
    let keytab = match &args.keytab {
        Some(k) => k.clone(),
        None => match vmgate_auth::discover::default_keytab() {
            Ok(k) => k,
            Err(e) => return fail(json, &e, exit::USAGE, None),
        },
    };
    let dir = match args.conn.connect() {
        Ok(d) => d,
        Err(e) => return fail(json, &e, e.exit_code(), e.diagnosis().as_ref()),
    };
    let request = RefreshRequest {
        keytab,
        account: args.account.clone(),
        realm: args.realm.clone(),
        allow_reset: args.reset,
    };
    let host = vmgate_auth::discover::system_host_name().unwrap_or_else(|| "this host".into());
    match refresh::refresh(&dir, &request) {
        Ok(report) => {
            let text = || {
                format!(
                    "Refreshed {}: {} key version {} -> {} ({}), {} for {}; the version-{} keys \
                     are kept for tickets issued before\n",
                    report.keytab.display(),
                    report.account,
                    report.previous_kvno,
                    report.kvno,
                    match report.method {
                        refresh::ChangeMethod::Kpasswd => "password changed with kpasswd",
                        refresh::ChangeMethod::LdapReset => "password reset over LDAP",
                    },
                    report
                        .enctypes
                        .iter()
                        .map(|e| match *e {
                            refresh::AES256 => "aes256-cts-hmac-sha1-96",
                            refresh::AES128 => "aes128-cts-hmac-sha1-96",
                            _ => "arcfour-hmac",
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    report.principals.join(", "),
                    report.previous_kvno
                )
            };
            match output::print_result("vmgate host keytab refresh", json, &report, text) {
                Ok(()) => exit::OK,
                Err(code) => code,
            }
        }
        Err(e) => {
            let d = e.diagnosis(&host);
            let code = match &e {
                refresh::RefreshError::NoAccount { .. } => exit::NOT_FOUND,
                refresh::RefreshError::Change { .. } => exit::DENIED,
                refresh::RefreshError::Directory { source, .. } => {
                    crate::conn::directory_exit_code(source)
                }
                _ => exit::REFUSED,
            };
            fail(json, &e, code, Some(&d))
        }
    }
}
