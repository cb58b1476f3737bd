//! How a command reaches the directory: flags and `VMGATE_LDAP_*` variables.
//!
//! | flag | variable | meaning |
//! |---|---|---|
//! | `--ldap-url URL` | `VMGATE_LDAP_URL` | `ldaps://host[:port]`, or `ldap://host[:port]` (always upgraded with StartTLS) |
//! | `--ldap-ca FILE` | `VMGATE_LDAP_CA` | PEM file of the CAs to trust (default: the system's CAs) |
//! | `--bind-user NAME` | `VMGATE_LDAP_BIND_USER` | simple bind as `NAME` (`alice`, `alice@realm`, `LAB\alice`, a DN) |
//! | `--password-file FILE` | `VMGATE_LDAP_PASSWORD_FILE` | the bind password: the file's first line |
//! | `--gssapi` | `VMGATE_LDAP_GSSAPI=1` | bind with Kerberos (the ccache in `KRB5CCNAME`), even if a bind user is set |
//! | `--insecure-skip-tls-verify` | — | do not verify the DC's certificate (lab use only) |
//!
//! Without `--gssapi` and without a bind user, the bind uses Kerberos, as Windows tools use the
//! logged-on user. Without a URL, the domain controller is found the way a joined host finds it:
//! the realm from krb5.conf's `default_realm`, the DCs from DNS (`_ldap._tcp.dc._msdcs.<domain>`
//! SRV records), the first that answers (see [`vmgate_auth::discover`]); a simple bind then uses
//! StartTLS, its certificate checked against the system's trust store by the DC's name. With a bind user and no password file, the password is asked for on the
//! terminal (without echo) — only when standard input is a terminal; otherwise it is an error.
//!
//! Other commands reuse this: flatten [`ConnArgs`] into their clap arguments and call
//! [`ConnArgs::connect`]; map failures to exit codes with [`ConnError::exit_code`].

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use vmgate_auth::directory::{
    Bind, Directory, DirectoryConfig, DirectoryError, ErrorKind, TlsVerification,
};
use vmgate_auth::{Diagnosis, Secret};

use crate::exit;

/// The largest password file read.
const MAX_PASSWORD_FILE: u64 = 4096;

/// Directory connection arguments (flatten into a clap command).
///
/// Each option falls back to its `VMGATE_LDAP_*` variable when not given; an empty variable
/// counts as unset. The variables are read by [`ConnArgs::config`], not by clap, so that the
/// resolution can be tested and an empty variable is not an error.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ConnArgs {
    /// Directory URL: ldaps://host[:port], or ldap://host[:port] with StartTLS [env: VMGATE_LDAP_URL].
    #[arg(long = "ldap-url", value_name = "URL", global = true)]
    pub ldap_url: Option<String>,
    /// PEM file with the CA certificates to trust for the directory's certificate
    /// [env: VMGATE_LDAP_CA].
    #[arg(long = "ldap-ca", value_name = "FILE", global = true)]
    pub ldap_ca: Option<PathBuf>,
    /// Simple bind as this user (alice, alice@lab.example.test, LAB\alice or a DN)
    /// [env: VMGATE_LDAP_BIND_USER].
    #[arg(long = "bind-user", value_name = "NAME", global = true)]
    pub bind_user: Option<String>,
    /// File whose first line is the bind password (asked for on a terminal otherwise)
    /// [env: VMGATE_LDAP_PASSWORD_FILE].
    #[arg(long = "password-file", value_name = "FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// Bind with Kerberos (GSSAPI, the credentials in KRB5CCNAME) instead of a password
    /// [env: VMGATE_LDAP_GSSAPI=1].
    #[arg(long, global = true)]
    pub gssapi: bool,
    /// Do not verify the directory's TLS certificate (a lab whose certificate cannot be fixed).
    #[arg(long = "insecure-skip-tls-verify", global = true)]
    pub insecure_skip_tls_verify: bool,
}

/// Errors of setting up a directory connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// No URL from the flag or the variable.
    #[error("no directory given: pass --ldap-url or set VMGATE_LDAP_URL")]
    MissingUrl,
    /// No URL was given and none could be found (realm, DNS).
    #[error("no directory given (--ldap-url) and none found: {}", crate::output::error_chain(.0))]
    Discover(#[source] Box<vmgate_auth::discover::DiscoverError>),
    /// The password file cannot be read.
    #[error("cannot read the password file {}", path.display())]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The password file is larger than any password.
    #[error("the password file {} is larger than {MAX_PASSWORD_FILE} bytes", path.display())]
    PasswordFileTooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A password file without a user.
    #[error("--password-file needs --bind-user (or VMGATE_LDAP_BIND_USER)")]
    PasswordWithoutUser,
    /// Nowhere to get the password from.
    #[error(
        "no password for {user}: pass --password-file (or VMGATE_LDAP_PASSWORD_FILE), run on a \
         terminal to be asked, or use --gssapi"
    )]
    NoPassword {
        /// The bind user.
        user: String,
    },
    /// Reading the password from the terminal failed.
    #[error("cannot read the password from the terminal")]
    Prompt(#[source] std::io::Error),
    /// Connecting or binding failed.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
}

impl ConnError {
    /// The exit code for this failure (see [`crate::exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            ConnError::Directory(e) => directory_exit_code(e),
            ConnError::Discover(e) => match e.directory_error() {
                Some(d) => directory_exit_code(d),
                None => exit::UNREACHABLE,
            },
            _ => exit::USAGE,
        }
    }

    /// The Windows code, cause and fix, when there is one.
    pub fn diagnosis(&self) -> Option<Diagnosis> {
        match self {
            ConnError::Directory(e) => e.diagnosis(),
            ConnError::Discover(e) => e.directory_error().and_then(DirectoryError::diagnosis),
            _ => None,
        }
    }
}

/// The exit code for a directory failure.
pub fn directory_exit_code(err: &DirectoryError) -> u8 {
    match err.kind() {
        ErrorKind::Unreachable => exit::UNREACHABLE,
        ErrorKind::Denied => exit::DENIED,
        ErrorKind::NotFound => exit::NOT_FOUND,
        ErrorKind::Refused => exit::REFUSED,
        ErrorKind::Usage => exit::USAGE,
    }
}

/// Reads the first line of a password file (bounded), without its line ending.
pub fn read_password_file(path: &Path) -> Result<Secret, ConnError> {
    let err = |source| ConnError::PasswordFile {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(err)?;
    let mut bytes = Vec::new();
    file.take(MAX_PASSWORD_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_PASSWORD_FILE {
        return Err(ConnError::PasswordFileTooLarge {
            path: path.to_owned(),
        });
    }
    // The whole file is held as a Secret too, so it is zeroed when dropped.
    let text = Secret::new(String::from_utf8(bytes).map_err(|_| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the password is not UTF-8",
        ))
    })?);
    Ok(Secret::new(
        text.expose().lines().next().unwrap_or_default(),
    ))
}

impl ConnArgs {
    /// These arguments with every unset option taken from its `VMGATE_LDAP_*` variable, as
    /// `var` reports it (`None` or empty: unset).
    pub fn with_env(&self, var: impl Fn(&str) -> Option<String>) -> ConnArgs {
        let get = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        ConnArgs {
            ldap_url: self.ldap_url.clone().or_else(|| get("VMGATE_LDAP_URL")),
            ldap_ca: self
                .ldap_ca
                .clone()
                .or_else(|| get("VMGATE_LDAP_CA").map(PathBuf::from)),
            bind_user: self
                .bind_user
                .clone()
                .or_else(|| get("VMGATE_LDAP_BIND_USER")),
            password_file: self
                .password_file
                .clone()
                .or_else(|| get("VMGATE_LDAP_PASSWORD_FILE").map(PathBuf::from)),
            gssapi: self.gssapi
                || get("VMGATE_LDAP_GSSAPI").is_some_and(|v| {
                    matches!(
                        v.trim().to_ascii_lowercase().as_str(),
                        "1" | "true" | "yes" | "on"
                    )
                }),
            insecure_skip_tls_verify: self.insecure_skip_tls_verify,
        }
    }

    /// The directory configuration these arguments and the process's `VMGATE_LDAP_*`
    /// variables describe (reads the password file or asks for the password).
    pub fn config(&self) -> Result<DirectoryConfig, ConnError> {
        self.with_env(|name| std::env::var(name).ok())
            .resolved_config()
    }

    /// The configuration from these arguments alone (no variables).
    fn resolved_config(&self) -> Result<DirectoryConfig, ConnError> {
        let url = self
            .ldap_url
            .clone()
            .filter(|u| !u.trim().is_empty())
            .ok_or(ConnError::MissingUrl)?;
        self.config_for(url)
    }

    /// The configuration for `url` from these arguments (reads the password file or asks).
    fn config_for(&self, url: String) -> Result<DirectoryConfig, ConnError> {
        let user = self.bind_user.clone().filter(|u| !u.trim().is_empty());
        let bind = match (self.gssapi, user) {
            (true, _) => Bind::Gssapi,
            (false, Some(user)) => {
                let password = match &self.password_file {
                    Some(path) => read_password_file(path)?,
                    None if std::io::stdin().is_terminal() => {
                        let prompt = format!("Password for {user}: ");
                        Secret::new(rpassword::prompt_password(prompt).map_err(ConnError::Prompt)?)
                    }
                    None => return Err(ConnError::NoPassword { user }),
                };
                Bind::Simple { user, password }
            }
            (false, None) if self.password_file.is_some() => {
                return Err(ConnError::PasswordWithoutUser);
            }
            (false, None) => Bind::Gssapi,
        };
        let mut config = DirectoryConfig::new(url, self.ldap_ca.clone(), bind);
        if self.insecure_skip_tls_verify {
            config.tls = TlsVerification::InsecureSkipVerify;
        }
        Ok(config)
    }

    /// Connects and binds: to the URL given, else to the first domain controller DNS names
    /// for krb5.conf's default realm.
    pub fn connect(&self) -> Result<Directory, ConnError> {
        let args = self.with_env(|name| std::env::var(name).ok());
        if args
            .ldap_url
            .as_deref()
            .is_some_and(|u| !u.trim().is_empty())
        {
            return Ok(Directory::connect(&args.resolved_config()?)?);
        }
        let realm =
            vmgate_auth::discover::default_realm().map_err(|e| ConnError::Discover(Box::new(e)))?;
        // The bind (and a password prompt) is settled once, before any DC is tried.
        let base = args.config_for(String::new())?;
        vmgate_auth::discover::connect_directory(
            &realm,
            base.bind.clone(),
            base.ca_file.clone(),
            |c| {
                c.tls = base.tls;
            },
        )
        .map_err(|e| match *Box::new(e) {
            vmgate_auth::discover::DiscoverError::DirectoryUnavailable { source, .. }
                if source.kind() != ErrorKind::Unreachable =>
            {
                ConnError::Directory(*source)
            }
            other => ConnError::Discover(Box::new(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ConnArgs {
        ConnArgs {
            ldap_url: Some("ldaps://127.0.0.10".into()),
            ..ConnArgs::default()
        }
    }

    #[test]
    fn password_file_gives_its_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret pass\r\nsecond line\n").unwrap();
        assert_eq!(read_password_file(&p).unwrap().expose(), "s3cret pass");
        std::fs::write(&p, vec![b'a'; 5000]).unwrap();
        assert!(matches!(
            read_password_file(&p),
            Err(ConnError::PasswordFileTooLarge { .. })
        ));
        let missing = dir.path().join("missing");
        let e = read_password_file(&missing).unwrap_err();
        assert_eq!(e.exit_code(), exit::USAGE);
        assert!(e.to_string().contains("missing"));
    }

    #[test]
    fn chooses_the_bind() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "pw\n").unwrap();

        let c = args().resolved_config().unwrap();
        assert!(matches!(c.bind, Bind::Gssapi));
        assert_eq!(c.tls, TlsVerification::Verify);

        let mut a = args();
        a.bind_user = Some("alice".into());
        a.password_file = Some(p.clone());
        match a.resolved_config().unwrap().bind {
            Bind::Simple { user, password } => {
                assert_eq!((user.as_str(), password.expose()), ("alice", "pw"));
            }
            Bind::Gssapi => panic!("expected a simple bind"),
        }
        a.gssapi = true;
        assert!(matches!(a.resolved_config().unwrap().bind, Bind::Gssapi));

        let mut a = args();
        a.password_file = Some(p);
        assert!(matches!(
            a.resolved_config(),
            Err(ConnError::PasswordWithoutUser)
        ));

        let mut a = args();
        a.ldap_url = None;
        assert!(matches!(a.resolved_config(), Err(ConnError::MissingUrl)));

        let mut a = args();
        a.insecure_skip_tls_verify = true;
        assert_eq!(
            a.resolved_config().unwrap().tls,
            TlsVerification::InsecureSkipVerify
        );
    }

    #[test]
    fn variables_fill_what_flags_leave_unset_and_empty_ones_are_unset() {
        let env = |name: &str| -> Option<String> {
            match name {
                "VMGATE_LDAP_URL" => Some("ldaps://from-env".into()),
                "VMGATE_LDAP_CA" => Some("/env/ca.pem".into()),
                "VMGATE_LDAP_BIND_USER" => Some(String::new()),
                "VMGATE_LDAP_PASSWORD_FILE" => Some("  ".into()),
                "VMGATE_LDAP_GSSAPI" => Some("yes".into()),
                _ => None,
            }
        };
        let a = ConnArgs::default().with_env(env);
        assert_eq!(a.ldap_url.as_deref(), Some("ldaps://from-env"));
        assert_eq!(a.ldap_ca.as_deref(), Some(Path::new("/env/ca.pem")));
        assert_eq!(a.bind_user, None);
        assert_eq!(a.password_file, None);
        assert!(a.gssapi);
        let flags = ConnArgs {
            ldap_url: Some("ldaps://from-flag".into()),
            ..ConnArgs::default()
        };
        assert_eq!(
            flags.with_env(env).ldap_url.as_deref(),
            Some("ldaps://from-flag")
        );
        assert!(!ConnArgs::default().with_env(|_| None).gssapi);
    }
}
