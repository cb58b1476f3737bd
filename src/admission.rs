//! Who may use the local control socket: checked on the peer's credentials as the kernel
//! reports them (`SO_PEERCRED`: the uid, gid and pid of the process that connected), before a
//! byte is read.
//!
//! * uid 0 is admitted;
//! * otherwise the peer's user must belong to the configured `local_group`, as its primary
//!   group or a supplementary one (`getgrouplist` of the uid's user entry, read at each
//!   connection, so that `usermod -aG` takes effect without a restart);
//! * anyone else is refused, and told why and how to get access.
//!
//! Only [`admit`] creates the [`LocalAdmitted`] proof that a local caller needs to reach the
//! daemon's dispatch ([`crate::caller::Caller::local`]).

#![forbid(unsafe_code)]

use std::ffi::CString;
use std::fmt;

use serde::Serialize;

/// How a peer was admitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Admission {
    /// uid 0.
    Root,
    /// A member of the configured local group.
    GroupMember {
        /// The group.
        group: String,
    },
}

/// The process at the other end of a connection, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocalPeer {
    /// Its uid.
    pub uid: u32,
    /// Its gid (at connect time).
    pub gid: u32,
    /// Its pid (at connect time).
    pub pid: i32,
    /// The uid's user name, when it has one.
    pub user: Option<String>,
    /// Why it was admitted.
    pub admission: Admission,
}

/// Proof that [`admit`] let a local peer in. It cannot be made anywhere else.
#[derive(Debug)]
pub struct LocalAdmitted {
    _private: (),
}

/// `nobody (uid 65534)`, or `uid 4000000000` for a uid without a user entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Who {
    /// The uid.
    pub uid: u32,
    /// Its user name.
    pub name: Option<String>,
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{n} (uid {})", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

/// Why a local peer was refused (each says how to get access).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Not root, and no local group is configured.
    #[error("{who} is not root, and no local_group is configured: only root may use this socket")]
    RootOnly {
        /// The peer.
        who: Who,
    },
    /// The configured group does not exist.
    #[error(
        "{who} is not root, and the configured local_group \"{group}\" does not exist on this \
         host (fix: groupadd {group})"
    )]
    NoSuchGroup {
        /// The peer.
        who: Who,
        /// The group.
        group: String,
    },
    /// The group database could not be read.
    #[error("cannot look up the group \"{group}\"")]
    GroupLookup {
        /// The group.
        group: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The uid has no user entry, so its groups are unknown.
    #[error("{who} has no user entry, so its membership of \"{group}\" cannot be checked")]
    NoUserEntry {
        /// The peer.
        who: Who,
        /// The group.
        group: String,
    },
    /// Not a member of the group.
    #[error(
        "{who} is not root and not a member of the local group \"{group}\" (fix: usermod -aG \
         {group} {user}, then log in again)"
    )]
    NotMember {
        /// The peer.
        who: Who,
        /// The group.
        group: String,
        /// The user's name.
        user: String,
    },
}

/// Decides whether a uid may use the socket (root, or a member of `local_group`). Reads the
/// user and group databases (NSS): call it off the async runtime.
pub fn admit(
    uid: u32,
    gid: u32,
    pid: i32,
    local_group: Option<&str>,
) -> Result<(LocalPeer, LocalAdmitted), Refusal> {
    use nix::unistd::{Group, Uid, User, getgrouplist};
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
    let name = user.as_ref().map(|u| u.name.clone());
    let admitted = |admission| {
        (
            LocalPeer {
                uid,
                gid,
                pid,
                user: name.clone(),
                admission,
            },
            LocalAdmitted { _private: () },
        )
    };
    if uid == 0 {
        return Ok(admitted(Admission::Root));
    }
    let who = Who {
        uid,
        name: name.clone(),
    };
    let Some(group_name) = local_group else {
        return Err(Refusal::RootOnly { who });
    };
    let group = match Group::from_name(group_name) {
        Ok(Some(g)) => g,
        Ok(None) => {
            return Err(Refusal::NoSuchGroup {
                who,
                group: group_name.to_owned(),
            });
        }
        Err(source) => {
            return Err(Refusal::GroupLookup {
                group: group_name.to_owned(),
                source,
            });
        }
    };
    let Some(user) = user else {
        return Err(Refusal::NoUserEntry {
            who,
            group: group_name.to_owned(),
        });
    };
    // The primary group (from the user entry) and the supplementary ones (from the group
    // database); getgrouplist lists both.
    let member = user.gid == group.gid
        || CString::new(user.name.clone())
            .ok()
            .and_then(|cname| getgrouplist(&cname, user.gid).ok())
            .is_some_and(|groups| groups.contains(&group.gid));
    if member {
        Ok(admitted(Admission::GroupMember {
            group: group_name.to_owned(),
        }))
    } else {
        Err(Refusal::NotMember {
            who,
            group: group_name.to_owned(),
            user: user.name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_admitted_and_unknown_uids_are_not() {
        let (p, _proof) = admit(0, 0, 1, None).unwrap();
        assert_eq!(p.admission, Admission::Root);
        let e = admit(4_000_000_000, 4_000_000_000, 1, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "uid 4000000000 is not root, and no local_group is configured: only root may use this socket"
        );
        let e = admit(4_000_000_000, 4_000_000_000, 1, Some("root")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "uid 4000000000 has no user entry, so its membership of \"root\" cannot be checked"
        );
        let e = admit(65534, 65534, 1, Some("no-such-group-vmgate"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"no-such-group-vmgate\" does not exist"), "{e}");
    }
}
