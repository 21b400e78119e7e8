/* dovepush C shim: the only C code in dovepush.
 *
 * It turns Dovecot's macros, inline functions and private structs into a
 * handful of plain functions with plain types, so that the Rust side needs no
 * knowledge of Dovecot's struct layouts. Read by both `cc` (to compile the
 * shim) and bindgen (to declare it to Rust), so the two cannot drift.
 *
 * Threading: every function here must be called on Dovecot's own thread only.
 */
#ifndef DOVEPUSH_SHIM_H
#define DOVEPUSH_SHIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct mail_user;
struct mailbox;
struct module;

/* Log levels understood by dovepush_shim_log(). */
enum dovepush_log_level {
	DOVEPUSH_LOG_DEBUG = 0,
	DOVEPUSH_LOG_INFO = 1,
	DOVEPUSH_LOG_WARNING = 2,
	DOVEPUSH_LOG_ERROR = 3,
};

/* Facts copied out of one saved mail. Strings are valid only during the
 * callback; NULL means "not present" (or could not be read). */
struct dovepush_saved_mail {
	const char *from;
	const char *subject;
	const char *snippet;
};

/* Facts of a committed delivery transaction, valid only during the callback. */
struct dovepush_commit {
	uint32_t uid_validity;
	/* UIDs assigned to the transaction's saves, in save order. */
	const uint32_t *uids;
	unsigned int uid_count;
	/* When true, `unseen` is the mailbox's unseen count right after the
	   commit; otherwise ask the mailbox (dovepush_shim_mailbox_unseen()). */
	bool unseen_known;
	uint32_t unseen;
};

/* Facts of a committed transaction outside deliveries (in imap: one IMAP
   command's) that changed \Seen flags, expunged mails or added unseen ones,
   valid only during the callback. Moving mails out of a mailbox is an
   expunge there; moving them in is an add. */
struct dovepush_change {
	uint32_t uid_validity;
	/* Mails that got \Seen, and mails that lost it. */
	unsigned int seen_set;
	unsigned int seen_cleared;
	/* Mails expunged, and of those the ones without \Seen. */
	unsigned int expunged;
	unsigned int expunged_unseen;
	/* Mails without \Seen added by APPEND, COPY or MOVE (saved mails with
	   \Seen are not counted: they leave the unseen count alone). */
	unsigned int added_unseen;
	/* The highest UID among the mails above (of the added ones: the last
	   unseen mail's, when the commit assigned UIDs). */
	uint32_t last_uid;
	/* When true, `unseen` is the mailbox's unseen count after the
	   transaction, its expunges taken off (the index keeps expunged mails
	   until the next sync). */
	bool unseen_known;
	uint32_t unseen;
};

/* Rust callbacks. Each one is entered through the Rust panic guard. */
struct dovepush_callbacks {
	/* First save of a delivery (POST_SESSION) transaction. Returns an opaque
	   state for the transaction, or NULL when it is not of interest. */
	void *(*delivery_begin)(struct mail_user *user, struct mailbox *box);
	/* A mail was saved in a transaction whose begin returned a state. */
	void (*mail_saved)(void *state, const struct dovepush_saved_mail *mail);
	/* The transaction was committed; state is consumed. */
	void (*delivery_commit)(void *state, struct mail_user *user,
				struct mailbox *box,
				const struct dovepush_commit *commit);
	/* The transaction was rolled back (or its commit failed); state is consumed. */
	void (*delivery_rollback)(void *state);
	/* The first \Seen change, expunge or unseen save of a transaction that
	   is not a delivery. Returns an opaque state for the transaction, or NULL when it
	   is not of interest (then the rest of it costs nothing). */
	void *(*change_begin)(struct mail_user *user, struct mailbox *box);
	/* That transaction was committed; state is consumed. */
	void (*change_commit)(void *state, struct mail_user *user,
			      struct mailbox *box,
			      const struct dovepush_change *change);
	/* It was rolled back (or its commit failed); state is consumed. */
	void (*change_rollback)(void *state);
};

/* Register the notify hooks. `module` is the plugin's own module. */
void dovepush_shim_register(struct module *module,
			    const struct dovepush_callbacks *callbacks);
void dovepush_shim_unregister(void);

const char *dovepush_shim_user_name(struct mail_user *user);
/* The user's dovepush settings among `names` (NULL-terminated), as
 * name/value pairs: *pairs_r gets 2 * count strings, valid until the current
 * callback returns; settings that are not set are left out. Returns the
 * count, or -1 with *error_r set.
 * - Dovecot 2.3: plugin {} or userdb values, %-expanded, as written.
 * - Dovecot 2.4: the typed global settings (settings_get()), with userdb
 *   overrides, written back in a syntax the 2.3 values may have: times as
 *   "<n>ms" or "<n>s", sizes in bytes, booleans "yes"/"no"; names 2.4 does
 *   not have (the 2.3 numbered endpoints) are left out. */
int dovepush_shim_user_settings(struct mail_user *user,
				const char *const *names,
				const char *const **pairs_r,
				const char **error_r);
bool dovepush_shim_user_mail_debug(struct mail_user *user);
/* Dovecot's base_dir (where the master's service sockets are). */
const char *dovepush_shim_user_base_dir(struct mail_user *user);

/* The mailbox's virtual name, e.g. "INBOX". */
const char *dovepush_shim_mailbox_vname(struct mailbox *box);

/* Read a private server attribute (IMAP: mailbox "" entry /private/<key>),
 * which Dovecot stores on the user's INBOX. Returns 1 found, 0 not set,
 * -1 error (error_r set). value_r stays valid until the current callback returns. */
int dovepush_shim_server_metadata(struct mailbox *box, const char *key,
				  const char **value_r, const char **error_r);

/* Unseen count of the mailbox as committed (index header, no sync). */
int dovepush_shim_mailbox_unseen(struct mailbox *box, uint32_t *unseen_r,
				 const char **error_r);

/* Log through Dovecot's logger with the user's log prefix (user may be NULL
 * for the process prefix). The message is never used as a format string. */
void dovepush_shim_log(struct mail_user *user, int level, const char *message);

#endif
