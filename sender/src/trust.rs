//! Whose records the service accepts.
//!
//! Mail processes run as the uids Dovecot delivers as: `mail_uid` when it is set (virtual
//! users), otherwise each system user's own uid (within `first_valid_uid` ..
//! `last_valid_uid`), and then a record may speak only for the user it was made for.
//! Root is trusted (lmtp and an admin's dovecot-lda). Any other local user can reach
//! neither the socket (its mode) nor, with an accepted record, the service: a record or
//! file of theirs is refused, logged and never sent.

/// The uids Dovecot delivers as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trust {
    pub mail_uid: Option<u32>,
    pub first_valid_uid: u32,
    /// 0: no upper bound.
    pub last_valid_uid: u32,
}

impl Trust {
    /// May a process or file of `uid` hand over events for the Dovecot user `user`?
    /// `uid_of` resolves a system user name.
    pub fn admits(
        &self,
        uid: u32,
        user: &str,
        uid_of: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<(), String> {
        if uid == 0 {
            return Ok(());
        }
        if let Some(mail_uid) = self.mail_uid {
            return if uid == mail_uid {
                Ok(())
            } else {
                Err(format!("uid {uid} is not the mail uid ({mail_uid})"))
            };
        }
        if uid < self.first_valid_uid || (self.last_valid_uid != 0 && uid > self.last_valid_uid) {
            return Err(format!(
                "uid {uid} is outside first_valid_uid .. last_valid_uid"
            ));
        }
        // System users: the record must be for the user whose uid wrote it.
        let local = user.split('@').next().unwrap_or(user);
        if uid_of(user) == Some(uid) || uid_of(local) == Some(uid) {
            Ok(())
        } else {
            Err(format!("uid {uid} may not speak for user {user}"))
        }
    }
}

/// The uid of a system user, from the system's user database.
pub fn system_uid(name: &str) -> Option<u32> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(name: &str) -> Option<u32> {
        match name {
            "alice" => Some(1001),
            "bob" => Some(1002),
            _ => None,
        }
    }

    #[test]
    fn virtual_users_only_the_mail_uid_and_root() {
        let t = Trust {
            mail_uid: Some(5000),
            first_valid_uid: 500,
            last_valid_uid: 0,
        };
        assert!(t.admits(5000, "anyone@example.com", &users).is_ok());
        assert!(t.admits(0, "alice", &users).is_ok());
        let err = t.admits(1001, "alice", &users).unwrap_err();
        assert!(err.contains("not the mail uid"));
    }

    #[test]
    fn system_users_speak_only_for_themselves() {
        let t = Trust {
            mail_uid: None,
            first_valid_uid: 1000,
            last_valid_uid: 1500,
        };
        assert!(t.admits(1001, "alice", &users).is_ok());
        assert!(t.admits(1001, "alice@example.com", &users).is_ok());
        assert!(t
            .admits(1001, "bob", &users)
            .unwrap_err()
            .contains("may not speak"));
        assert!(t.admits(999, "x", &users).unwrap_err().contains("outside"));
        assert!(t.admits(1600, "x", &users).unwrap_err().contains("outside"));
        assert!(t.admits(1003, "nobody", &users).is_err());
    }
}
