//! Helpers for integration tests against the Samba AD test domain (`tests/domain/up`).
//!
//! The domain is named by the variables `tests/domain/up` prints (`VMGATE_LDAP_URL`, ...);
//! [`Domain::from_env`] fails with a clear message when they are missing. Tests run in parallel
//! against one domain, so each creates its own uniquely named accounts ([`Domain::computer`],
//! [`Domain::user`]), which are deleted when dropped.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use vmgate_auth::Secret;
use vmgate_auth::directory::{Account, Bind, Directory, DirectoryConfig, filter};

/// The test domain, from the variables `tests/domain/up` prints.
#[derive(Clone, Debug)]
pub struct Domain {
    /// `VMGATE_LDAP_URL`
    pub ldap_url: String,
    /// `VMGATE_LDAP_CA`
    pub ldap_ca: PathBuf,
    /// `VMGATE_LDAP_BIND_USER`
    pub bind_user: String,
    /// `VMGATE_LDAP_PASSWORD_FILE`
    pub password_file: PathBuf,
    /// `KRB5_CONFIG`
    pub krb5_config: PathBuf,
    /// `VMGATE_REALM`
    pub realm: String,
    /// `VMGATE_TEST_DIR`
    pub test_dir: PathBuf,
    /// `VMGATE_DOMAIN_DIR`
    pub domain_dir: PathBuf,
    /// `VMGATE_BASE_DN`
    pub base_dn: String,
}

fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: these tests need the Samba test domain. Run them through \
             tests/run, or first: eval \"$(tests/domain/up)\""
        ),
    }
}

impl Domain {
    /// Reads the domain's variables; panics with a clear message when they are missing.
    pub fn from_env() -> Domain {
        Domain {
            ldap_url: var("VMGATE_LDAP_URL"),
            ldap_ca: var("VMGATE_LDAP_CA").into(),
            bind_user: var("VMGATE_LDAP_BIND_USER"),
            password_file: var("VMGATE_LDAP_PASSWORD_FILE").into(),
            krb5_config: var("KRB5_CONFIG").into(),
            realm: var("VMGATE_REALM"),
            test_dir: var("VMGATE_TEST_DIR").into(),
            domain_dir: var("VMGATE_DOMAIN_DIR").into(),
            base_dn: var("VMGATE_BASE_DN"),
        }
    }

    /// The DNS domain (`lab.example.test`).
    pub fn dns_domain(&self) -> String {
        self.realm.to_ascii_lowercase()
    }

    /// The administrator's password.
    pub fn admin_password(&self) -> Secret {
        let text = std::fs::read_to_string(&self.password_file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.password_file.display()));
        Secret::new(text.lines().next().unwrap_or_default())
    }

    /// A directory connection bound as the administrator.
    pub fn directory(&self) -> Directory {
        let mut config = DirectoryConfig::new(
            self.ldap_url.clone(),
            Some(self.ldap_ca.clone()),
            Bind::Simple {
                user: self.bind_user.clone(),
                password: self.admin_password(),
            },
        );
        // A test's bulk load may hold the DC's database for a while.
        config.timeout = std::time::Duration::from_secs(120);
        Directory::connect(&config).unwrap_or_else(|e| panic!("cannot connect: {e:?}"))
    }

    /// The DC's smb.conf (for samba-tool and ldb tools).
    pub fn smb_conf(&self) -> PathBuf {
        self.domain_dir.join("etc/smb.conf")
    }

    /// The domain partition's ldb file (writes there bypass the DC's checks: only for
    /// planting states the DC would refuse, such as an exact duplicate SPN).
    pub fn domain_partition(&self) -> PathBuf {
        let upper = self.base_dn.to_ascii_uppercase();
        self.domain_dir
            .join("private/sam.ldb.d")
            .join(format!("{upper}.ldb"))
    }

    /// `sam.ldb` (writes go through the DC's modules, like LDAP, but fast).
    pub fn sam_ldb(&self) -> PathBuf {
        self.domain_dir.join("private/sam.ldb")
    }

    /// A computer account `NAME$` with `dNSHostName` NAME.<domain>, a password and AES keys;
    /// deleted when the returned value is dropped.
    pub fn computer(&self, prefix: &str) -> TestAccount {
        let dir = self.directory();
        let name = unique_name(prefix);
        let dn = format!(
            "CN={},CN=Computers,{}",
            filter::escape_dn_value(&name),
            self.base_dn
        );
        let password = format!("Vt-{}-Pw1!", unique_name("p"));
        let fqdn = format!("{}.{}", name.to_ascii_lowercase(), self.dns_domain());
        let text = |s: &str| vec![s.as_bytes().to_vec()];
        dir.add_entry(
            &dn,
            vec![
                ("objectClass".into(), text("computer")),
                ("sAMAccountName".into(), text(&format!("{name}$"))),
                ("dNSHostName".into(), text(&fqdn)),
                ("userAccountControl".into(), text("4096")),
                ("msDS-SupportedEncryptionTypes".into(), text("28")),
            ],
        )
        .unwrap_or_else(|e| panic!("cannot create {dn}: {e:?}"));
        dir.set_password(&dn, &Secret::new(password.clone()))
            .unwrap_or_else(|e| panic!("cannot set the password of {dn}: {e:?}"));
        TestAccount {
            dir,
            dn,
            name,
            fqdn,
            password,
        }
    }

    /// A user account (enabled, with a password); deleted when dropped.
    pub fn user(&self, prefix: &str) -> TestAccount {
        let dir = self.directory();
        let name = unique_name(prefix);
        let dn = format!(
            "CN={},CN=Users,{}",
            filter::escape_dn_value(&name),
            self.base_dn
        );
        let password = format!("Vt-{}-Pw1!", unique_name("p"));
        let text = |s: &str| vec![s.as_bytes().to_vec()];
        dir.add_entry(
            &dn,
            vec![
                ("objectClass".into(), text("user")),
                ("sAMAccountName".into(), text(&name)),
                (
                    "userPrincipalName".into(),
                    text(&format!("{name}@{}", self.dns_domain())),
                ),
            ],
        )
        .unwrap_or_else(|e| panic!("cannot create {dn}: {e:?}"));
        dir.set_password(&dn, &Secret::new(password.clone()))
            .unwrap_or_else(|e| panic!("cannot set the password of {dn}: {e:?}"));
        dir.replace_values(&dn, "userAccountControl", &["512".to_owned()])
            .unwrap_or_else(|e| panic!("cannot enable {dn}: {e:?}"));
        TestAccount {
            dir,
            dn,
            fqdn: String::new(),
            name,
            password,
        }
    }

    /// A global security group; deleted when dropped.
    pub fn group(&self, prefix: &str) -> TestAccount {
        let dir = self.directory();
        let name = unique_name(prefix);
        let dn = format!(
            "CN={},CN=Users,{}",
            filter::escape_dn_value(&name),
            self.base_dn
        );
        let text = |s: &str| vec![s.as_bytes().to_vec()];
        dir.add_entry(
            &dn,
            vec![
                ("objectClass".into(), text("group")),
                ("sAMAccountName".into(), text(&name)),
            ],
        )
        .unwrap_or_else(|e| panic!("cannot create {dn}: {e:?}"));
        TestAccount {
            dir,
            dn,
            fqdn: String::new(),
            name,
            password: String::new(),
        }
    }

    /// Runs a program with the domain's variables (inherited) and `KRB5_CONFIG`.
    pub fn run<I, S>(&self, program: &str, args: I) -> Outcome
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_with(program, args, &[], None)
    }

    /// Like [`Domain::run`], with extra variables and standard input.
    pub fn run_with<I, S>(
        &self,
        program: &str,
        args: I,
        env: &[(&str, &str)],
        stdin: Option<&str>,
    ) -> Outcome
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("KRB5_CONFIG", &self.krb5_config)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write;
            pipe.write_all(text.as_bytes())
                .unwrap_or_else(|e| panic!("cannot write to {program}: {e}"));
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("{program} did not finish: {e}"));
        Outcome::from(out)
    }

    /// `kinit` as the administrator into a fresh credential cache in `dir`; returns the
    /// cache's name for `KRB5CCNAME`.
    pub fn kinit_admin(&self, dir: &Path) -> String {
        let ccache = format!(
            "FILE:{}",
            dir.join(format!("cc-{}", unique_name("k"))).display()
        );
        let principal = format!("Administrator@{}", self.realm);
        let pw = self.admin_password();
        let out = self.run_with(
            "kinit",
            [principal.as_str()],
            &[("KRB5CCNAME", &ccache)],
            Some(&format!("{}\n", pw.expose())),
        );
        assert_eq!(out.code, 0, "kinit failed: {out}");
        ccache
    }

    /// `kvno` for `principal` with the given cache (and, with `keytab`, decrypting the ticket
    /// with it: `kvno -k`).
    pub fn kvno(&self, ccache: &str, principal: &str, keytab: Option<&Path>) -> Outcome {
        let mut args: Vec<String> = Vec::new();
        if let Some(kt) = keytab {
            args.push("-k".into());
            args.push(kt.display().to_string());
        }
        args.push(principal.to_owned());
        self.run_with("kvno", &args, &[("KRB5CCNAME", ccache)], None)
    }

    /// Exports the keys of `principal` to `keytab` with samba-tool (fresh from the directory).
    pub fn export_keytab(&self, principal: &str, keytab: &Path) -> Outcome {
        let conf = self.smb_conf();
        self.run(
            "samba-tool",
            [
                OsStr::new("domain"),
                OsStr::new("exportkeytab"),
                keytab.as_os_str(),
                OsStr::new(&format!("--principal={principal}")),
                OsStr::new("-s"),
                conf.as_os_str(),
            ],
        )
    }

    /// Applies an LDIF with `ldbmodify` (or `ldbadd`) on `ldb`.
    pub fn ldb(&self, tool: &str, ldb: &Path, ldif: &str) -> Outcome {
        let file = std::env::temp_dir().join(format!("vmgate-{}.ldif", unique_name("l")));
        std::fs::write(&file, ldif)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
        let out = self.run(
            tool,
            [
                OsStr::new("-H"),
                OsStr::new(&format!("tdb://{}", ldb.display())),
                file.as_os_str(),
            ],
        );
        let _ = std::fs::remove_file(&file);
        out
    }
}

/// A unique short name: `prefix` + a per-process, per-call suffix (at most 15 characters for
/// prefixes of up to 4, so that it is a valid computer name).
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = (std::process::id().wrapping_mul(2_654_435_761) ^ nanos) & 0xf_ffff;
    format!("{prefix}{mix:05x}{:x}", n % 4096)
}

/// An account a test created; deleted on drop.
#[derive(Debug)]
pub struct TestAccount {
    /// A connection for checks.
    pub dir: Directory,
    /// The DN.
    pub dn: String,
    /// The name (without `$`).
    pub name: String,
    /// `name.<domain>` for computers, empty for users.
    pub fqdn: String,
    /// The password.
    pub password: String,
}

impl TestAccount {
    /// Re-reads the account.
    pub fn read(&self) -> Account {
        self.dir
            .read_account(&self.dn)
            .unwrap_or_else(|e| panic!("cannot read {}: {e:?}", self.dn))
            .unwrap_or_else(|| panic!("{} vanished", self.dn))
    }

    /// The stored `servicePrincipalName` values, sorted (twins included).
    pub fn stored_spns(&self) -> Vec<String> {
        let mut v = self.read().service_principal_names;
        v.sort();
        v
    }
}

impl Drop for TestAccount {
    fn drop(&mut self) {
        let _ = self.dir.delete_entry(&self.dn);
    }
}

/// The result of running a program.
#[derive(Debug)]
pub struct Outcome {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Outcome {
    fn from(o: Output) -> Outcome {
        Outcome {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}
