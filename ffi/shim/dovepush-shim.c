/* See include/dovepush-shim.h. Compiled with Dovecot's own include flags,
 * for Dovecot 2.3 or 2.4: the few API differences are the DOVEPUSH_DOVECOT24
 * blocks below (ffi/build.rs defines it from the version in config.h). */
#include "lib.h"
#include "array.h"
#include "str.h"
#include "seq-range-array.h"
#include "mail-storage-private.h"
#include "mail-user.h"
#include "mail-namespace.h"
#include "mailbox-attribute.h"
#include "mail-index.h"
#include "notify-plugin.h"
#include "module-dir.h"
#include "ioloop.h"
#include "master-service.h"
#include "mail-storage-service.h"
#include "hostpid.h"
#include "time-util.h"
#include "maildir-storage.h"
#include "maildir-uidlist.h"
#ifdef DOVEPUSH_DOVECOT24
#  include "settings.h"
#  include "settings-parser.h"
#  include "dovepush-settings.h"
#endif

#include <sys/stat.h>
#include <unistd.h>

#include "dovepush-shim.h"

/* Deferred UID assignment: the first try waits this long so that one
   locked append to dovecot-uidlist covers the deliveries of that time
   (the lock is what concurrent deliveries to one Maildir contend for);
   then it tries the lock again this often, and after the last delay it
   stops trying and waits for the lock instead. */
#define DOVEPUSH_UID_BATCH_MSECS 200
#define DOVEPUSH_UID_RETRY_MSECS 20
#define DOVEPUSH_UID_GIVE_UP_MSECS 10000

/* One saved mail, as Maildir knows it. */
struct dovepush_file {
	/* Storage id: the file name up to the first ':' ("" if unknown). */
	const char *base;
	/* The name the save gives the file in new/, as dovecot-uidlist
	   records it; NULL when the mail goes to cur/ (flags, keywords) or the
	   storage is not Maildir. */
	const char *new_name;
};

/* Per-transaction state, one per notify transaction: a delivery, or (when
   `change` is set) any other transaction, which may change \Seen flags,
   expunge mails or add them (APPEND, COPY, MOVE). */
struct dovepush_txn {
	struct mailbox *box;
	void *state;        /* Rust's, NULL when not of interest */
	bool decided;
	/* Not a delivery: only the counts below are kept (no pool). */
	bool change;
	struct dovepush_change facts;
	/* A change's saves so far, and the place of the last unseen one among
	   them (the commit's saved_uids are in save order). */
	unsigned int saves;
	unsigned int last_unseen_save;
	/* In lmtp, UIDs the storage did not assign at commit are assigned by
	   dovepush (see dovepush_assign_uids()) or resolved after the reply
	   (see dovepush_defer()). */
	bool defer_uids;
	pool_t pool;
	ARRAY(struct dovepush_file) files;   /* in save order */

	/* Set while waiting for deferred UID resolution. */
	struct dovepush_txn *next;
	/* Not lmtp's service user: keeping that alive past the delivery
	   breaks lmtp (its events hang off the finished recipient's). */
	struct mail_storage_service_ctx *service_ctx;
	const char *username;
	const char *vname;
	const char *uidlist_lock_path;
	uint32_t uid_validity;
	bool unseen_known;
	uint32_t unseen;
	struct timeval deferred_at;
};

ARRAY_DEFINE_TYPE(dovepush_txn, struct dovepush_txn *);

static struct notify_context *dovepush_notify_ctx;
static struct dovepush_callbacks dovepush_cb;
static struct dovepush_txn *dovepush_pending;
static struct timeout *dovepush_pending_to;

static void dovepush_txn_free(struct dovepush_txn *txn)
{
	pool_unref(&txn->pool);   /* a change has none */
	i_free(txn);
}

/* Can missing UIDs be resolved after the delivery is answered? Only in lmtp,
   whose ioloop runs on after each DATA reply, and only in a process that will
   serve another connection: dovecot-lda exits instead, and so does an lmtp
   process on its last connection (service_count = 1, or Dovecot stopping),
   often right after the reply. Those ask the storage for UIDs at commit. */
static bool dovepush_can_defer(void)
{
	return current_ioloop != NULL && master_service != NULL &&
		strcmp(master_service_get_name(master_service), "lmtp") == 0 &&
#ifdef DOVEPUSH_DOVECOT24
		/* 2.4 renamed service_count to restart_request_count. */
		master_service_get_restart_request_count(master_service) != 1 &&
#else
		master_service_get_service_count(master_service) != 1 &&
#endif
		!master_service_is_killed(master_service);
}

static void *dovepush_txn_begin(struct mailbox_transaction_context *t)
{
	struct dovepush_txn *txn;

	/* Only MTA deliveries (lda, lmtp, sieve keep/fileinto) open their
	   mailbox with POST_SESSION: the same test as the push_notification
	   plugin's MessageNew. Any other transaction (an IMAP command's) is
	   followed only for \Seen changes, expunges and unseen saves, with a
	   few counters: Rust is asked about it at its first such change, if
	   any. */
	if ((t->box->flags & MAILBOX_FLAG_POST_SESSION) == 0) {
		txn = i_new(struct dovepush_txn, 1);
		txn->box = t->box;
		txn->change = TRUE;
		return txn;
	}
	txn = i_new(struct dovepush_txn, 1);
	txn->box = t->box;
	txn->pool = pool_alloconly_create("dovepush txn", 512);
	p_array_init(&txn->files, txn->pool, 4);
	return txn;
}

/* The name a Maildir save gives a mail without flags or keywords in new/:
   its base name with the ",S=<size>" and ",W=<vsize>" the save appends
   (maildir_get_dest_filename()). NULL when the mail goes to cur/ instead. */
static const char *dovepush_maildir_new_name(struct mail *mail, const char *base)
{
	const char *const *keywords;
	uoff_t size;
	string_t *name;

	if (!mail->saving || mail->transaction->save_ctx == NULL)
		return NULL;
	if ((mail_get_flags(mail) & MAIL_FLAGS_MASK & ENUM_NEGATE(MAIL_RECENT)) != 0)
		return NULL;
	keywords = mail_get_keywords(mail);
	if (keywords != NULL && keywords[0] != NULL)
		return NULL;
	name = t_str_new(128);
	str_append(name, base);
	if (maildir_save_file_get_size(mail->transaction, mail->seq, FALSE,
				       &size) == 0)
		str_printfa(name, ",S=%"PRIuUOFF_T, size);
	if (maildir_save_file_get_size(mail->transaction, mail->seq, TRUE,
				       &size) == 0)
		str_printfa(name, ",W=%"PRIuUOFF_T, size);
	return str_c(name);
}

static bool dovepush_change_followed(struct dovepush_txn *txn);

/* A mail added outside a delivery (APPEND, or COPY/MOVE into the mailbox):
   only an unseen one moves the unseen count. Its UID comes at commit. */
static void dovepush_change_saved(struct dovepush_txn *txn, struct mail *mail)
{
	unsigned int place = txn->saves++;

	if ((mail_get_flags(mail) & MAIL_SEEN) != 0 ||
	    !dovepush_change_followed(txn))
		return;
	txn->facts.added_unseen++;
	txn->last_unseen_save = place;
}

static void dovepush_mail_save(void *txn_ptr, struct mail *mail)
{
	struct dovepush_txn *txn = txn_ptr;
	struct dovepush_saved_mail facts;
	struct dovepush_file file;
	const char *value;

	if (txn == NULL)
		return;
	if (txn->change) {
		dovepush_change_saved(txn, mail);
		return;
	}
	if (!txn->decided) {
		txn->decided = TRUE;
		T_BEGIN {
			txn->state = dovepush_cb.delivery_begin(
				txn->box->storage->user, txn->box);
		} T_END;
		txn->defer_uids = dovepush_can_defer();
		if (txn->state != NULL && !txn->defer_uids) {
			/* An app cannot open UID 0, and Maildir only
			   try-locks dovecot-uidlist at commit, assigning no
			   UID when another delivery holds it. Where UIDs
			   cannot be resolved after the reply (lda), ask the
			   storage to assign them at commit. */
			mail->transaction->flags |=
				MAILBOX_TRANSACTION_FLAG_ASSIGN_UIDS;
		}
	}
	if (txn->state == NULL)
		return;

	/* Maildir's storage id (the base file name) is known while saving
	   and is how dovepush finds the mail again if the commit assigns it
	   no UID (lmtp only: lda asked for UIDs above). Other storages lock
	   at commit and always assign UIDs. */
	i_zero(&file);
	file.base = "";
	if (txn->defer_uids &&
	    strcmp(mail->box->storage->name, "maildir") == 0 &&
	    mail_get_special(mail, MAIL_FETCH_STORAGE_ID, &value) == 0) {
		file.base = p_strdup(txn->pool, value);
		T_BEGIN {
			file.new_name = p_strdup(txn->pool,
				dovepush_maildir_new_name(mail, file.base));
		} T_END;
	}
	array_push_back(&txn->files, &file);

	T_BEGIN {
		i_zero(&facts);
		if (mail_get_first_header(mail, "From", &value) >= 0 &&
		    value != NULL)
			facts.from = value;
		if (mail_get_first_header(mail, "Subject", &value) >= 0 &&
		    value != NULL)
			facts.subject = value;
		if (mail_get_special(mail, MAIL_FETCH_BODY_SNIPPET, &value) >= 0 &&
		    value != NULL) {
			/* The first character is the snippet format version. */
			facts.snippet = value[0] == '\0' ? value : value + 1;
		}
		dovepush_cb.mail_saved(txn->state, &facts);
	} T_END;
}

static void dovepush_mail_copy(void *txn_ptr, struct mail *src ATTR_UNUSED,
			       struct mail *dst)
{
	/* A delivery to several recipients stores the later ones by copying:
	   notify reports those as saves already; a real COPY into a delivery
	   mailbox does not happen. Treat both the same. */
	dovepush_mail_save(txn_ptr, dst);
}

/* Is this change transaction of interest? Rust decides at its first \Seen
   change, expunge or unseen save. */
static bool dovepush_change_followed(struct dovepush_txn *txn)
{
	if (!txn->decided) {
		txn->decided = TRUE;
		T_BEGIN {
			txn->state = dovepush_cb.change_begin(
				txn->box->storage->user, txn->box);
		} T_END;
	}
	return txn->state != NULL;
}

static void dovepush_change_uid(struct dovepush_txn *txn, struct mail *mail)
{
	if (mail->uid > txn->facts.last_uid)
		txn->facts.last_uid = mail->uid;
}

static void dovepush_mail_update_flags(void *txn_ptr, struct mail *mail,
				       enum mail_flags old_flags)
{
	struct dovepush_txn *txn = txn_ptr;
	enum mail_flags new_flags;

	if (txn == NULL || !txn->change)
		return;
	/* notify calls this after the update: the mail has its new flags. */
	new_flags = mail_get_flags(mail);
	if (((old_flags ^ new_flags) & MAIL_SEEN) == 0 ||
	    !dovepush_change_followed(txn))
		return;
	if ((new_flags & MAIL_SEEN) != 0)
		txn->facts.seen_set++;
	else
		txn->facts.seen_cleared++;
	dovepush_change_uid(txn, mail);
}

static void dovepush_mail_expunge(void *txn_ptr, struct mail *mail)
{
	struct dovepush_txn *txn = txn_ptr;

	/* A delivery does not expunge; its transaction is left alone. */
	if (txn == NULL || !txn->change || !dovepush_change_followed(txn))
		return;
	txn->facts.expunged++;
	if ((mail_get_flags(mail) & MAIL_SEEN) == 0)
		txn->facts.expunged_unseen++;
	dovepush_change_uid(txn, mail);
}

/* A committed change: its mailbox's unseen count and UIDVALIDITY, the UID
   of the last unseen mail it saved, then Rust. */
static void dovepush_change_commit(struct dovepush_txn *txn,
				   const struct mail_transaction_commit_changes *changes)
{
	struct mailbox_status status;
	struct seq_range_iter iter;
	const char *error;
	uint32_t unseen, uid, not_indexed;

	/* saved_uids lists the UIDs in save order (as COPYUID does). A storage
	   that assigned none at commit (imap's APPEND and COPY ask it to) has
	   not indexed the mails either: they are counted on top below. */
	not_indexed = 0;
	if (txn->facts.added_unseen > 0) {
		seq_range_array_iter_init(&iter, &changes->saved_uids);
		if (seq_range_array_iter_nth(&iter, txn->last_unseen_save, &uid)) {
			if (uid > txn->facts.last_uid)
				txn->facts.last_uid = uid;
		} else if (seq_range_count(&changes->saved_uids) == 0) {
			not_indexed = txn->facts.added_unseen;
		}
	}
	T_BEGIN {
		mailbox_get_open_status(txn->box, STATUS_UIDVALIDITY, &status);
		txn->facts.uid_validity = status.uidvalidity;
		/* The index has the flag changes now, but it keeps expunged
		   mails until the storage syncs them (imap does so after the
		   command): take this transaction's off. */
		if (dovepush_shim_mailbox_unseen(txn->box, &unseen, &error) == 0) {
			txn->facts.unseen_known = TRUE;
			unseen += not_indexed;
			txn->facts.unseen =
				unseen > txn->facts.expunged_unseen ?
				unseen - txn->facts.expunged_unseen : 0;
		}
		dovepush_cb.change_commit(txn->state, txn->box->storage->user,
					  txn->box, &txn->facts);
	} T_END;
}

static void dovepush_resolve_pending(void *context ATTR_UNUSED);

/* Deactivate the ioloop context active in `ioloop` (if any) while a timer or
   io is added there. A timer or io remembers the context active when it was
   added (here: the delivering user's) and activates it again when it fires,
   re-pushing the global events that context had; by then lmtp has
   deinitialized that user, and its stale events break lmtp's global event
   stack. */
static struct ioloop_context *dovepush_context_suspend(struct ioloop *ioloop)
{
	struct ioloop_context *ctx = io_loop_get_current_context(ioloop);

	if (ctx != NULL) {
		io_loop_context_ref(ctx);
		io_loop_context_deactivate(ctx);
	}
	return ctx;
}

/* Undo dovepush_context_suspend(). */
static void dovepush_context_resume(struct ioloop_context *ctx)
{
	if (ctx != NULL) {
		io_loop_context_activate(ctx);
		io_loop_context_unref(&ctx);
	}
}

/* A timer that belongs to no ioloop context. */
static struct timeout *dovepush_timeout_add_detached(unsigned int msecs)
{
	struct ioloop_context *ctx = dovepush_context_suspend(current_ioloop);
	struct timeout *to;

	to = timeout_add_short(msecs, dovepush_resolve_pending, NULL);
	dovepush_context_resume(ctx);
	return to;
}

/* Can dovepush_assign_uids() handle this transaction's mails? Only mails
   that went to new/ (the caller checks that the storage is Maildir). */
static bool dovepush_can_assign(const struct dovepush_txn *txn)
{
	const struct dovepush_file *file;

	array_foreach(&txn->files, file) {
		if (file->new_name == NULL)
			return FALSE;
	}
	return TRUE;
}

/* Give Maildir mails the storage left without a UID their UIDs, the way the
   save itself does when it gets the lock: take dovecot-uidlist's lock
   without waiting, append the files of all these transactions (those
   dovepush_can_assign() accepts) at once
   (Dovecot adds them to the index at its next locked save or sync). Their
   UIDs can then be read with maildir_uidlist_get_uid(). Returns 1 when
   done, 0 when the lock is busy, -1 on failure. */
static int dovepush_assign_uids(struct mailbox *box,
				struct dovepush_txn *const *txns,
				unsigned int txn_count)
{
	struct maildir_mailbox *mbox = MAILDIR_MAILBOX(box);
	struct maildir_uidlist_sync_ctx *sync_ctx;
	const struct dovepush_file *file;
	unsigned int i;
	uint32_t uid;
	int ret;

	ret = maildir_uidlist_sync_init(mbox->uidlist,
					MAILDIR_UIDLIST_SYNC_PARTIAL |
					MAILDIR_UIDLIST_SYNC_TRYLOCK, &sync_ctx);
	if (ret <= 0)
		return ret;
	/* Locked and refreshed: a mail someone else has listed meanwhile
	   keeps its UID. */
	for (i = 0; i < txn_count; i++) {
		if (!dovepush_can_assign(txns[i]))
			continue;
		array_foreach(&txns[i]->files, file) {
			if (!maildir_uidlist_get_uid(mbox->uidlist,
						     file->new_name, &uid)) {
				(void)maildir_uidlist_sync_next(sync_ctx,
					file->new_name,
					MAILDIR_UIDLIST_REC_FLAG_NEW_DIR |
					MAILDIR_UIDLIST_REC_FLAG_RECENT);
			}
		}
	}
	return maildir_uidlist_sync_deinit(&sync_ctx, TRUE) < 0 ? -1 : 1;
}

/* The UIDs dovepush_assign_uids() gave a transaction's mails. */
static bool dovepush_assigned_uids(struct mailbox *box,
				   const struct dovepush_txn *txn,
				   uint32_t *uids_r)
{
	struct maildir_mailbox *mbox = MAILDIR_MAILBOX(box);
	const struct dovepush_file *files;
	unsigned int i, count;

	files = array_get(&txn->files, &count);
	for (i = 0; i < count; i++) {
		if (!maildir_uidlist_get_uid(mbox->uidlist, files[i].new_name,
					     &uids_r[i]) ||
		    uids_r[i] == 0 || uids_r[i] == (uint32_t)-1)
			return FALSE;
	}
	return TRUE;
}

/* The unseen count right after the commit. Mails the storage left without
   a UID are not in the index yet: count this delivery's ones on top. */
static bool dovepush_unseen_after_commit(struct mailbox *box,
					 unsigned int not_indexed,
					 uint32_t *unseen_r)
{
	const char *error;
	bool known;

	T_BEGIN {
		known = dovepush_shim_mailbox_unseen(box, unseen_r, &error) == 0;
	} T_END;
	*unseen_r += not_indexed;
	return known;
}

static void dovepush_commit_uids(struct dovepush_txn *txn,
				 struct mail_user *user, struct mailbox *box,
				 const uint32_t *uids, unsigned int count)
{
	struct dovepush_commit commit;

	i_zero(&commit);
	commit.uid_validity = txn->uid_validity;
	commit.uids = uids;
	commit.uid_count = count;
	commit.unseen_known = txn->unseen_known;
	commit.unseen = txn->unseen;
	dovepush_cb.delivery_commit(txn->state, user, box, &commit);
}

/* Keep the transaction's facts for dovepush_resolve_pending(), which runs
   after lmtp has written its reply and works with a fresh mail user (lmtp
   requires its own to be gone by then). */
static void dovepush_defer(struct dovepush_txn *txn)
{
	const char *control_dir;

	struct mail_user *user = txn->box->storage->user;

#ifdef DOVEPUSH_DOVECOT24
	struct mail_storage_service_user *service_user = user->service_user;
#else
	struct mail_storage_service_user *service_user = user->_service_user;
#endif
	txn->service_ctx = service_user == NULL ? NULL :
		mail_storage_service_user_get_service_ctx(service_user);
	txn->username = p_strdup(txn->pool, user->username);
	txn->vname = p_strdup(txn->pool, mailbox_get_vname(txn->box));
	if (mailbox_get_path_to(txn->box, MAILBOX_LIST_PATH_TYPE_CONTROL,
				&control_dir) > 0) {
		txn->uidlist_lock_path = p_strconcat(txn->pool, control_dir,
			"/"MAILDIR_UIDLIST_NAME".lock", NULL);
	}
	txn->deferred_at = ioloop_timeval;
	txn->box = NULL;
	txn->next = dovepush_pending;
	dovepush_pending = txn;
	if (dovepush_pending_to == NULL) {
		dovepush_pending_to =
			dovepush_timeout_add_detached(DOVEPUSH_UID_BATCH_MSECS);
	}
}

static void
dovepush_txn_commit(void *txn_ptr, struct mail_transaction_commit_changes *changes)
{
	struct dovepush_txn *txn = txn_ptr;
	struct seq_range_iter iter;
	struct mailbox_status status;
	unsigned int n = 0, count, saved;
	uint32_t uid;

	if (txn == NULL)
		return;
	if (txn->state == NULL) {
		dovepush_txn_free(txn);
		return;
	}
	if (txn->change) {
		dovepush_change_commit(txn, changes);
		dovepush_txn_free(txn);
		return;
	}
	txn->uid_validity = changes->uid_validity;
	if (txn->uid_validity == 0) {
		mailbox_get_open_status(txn->box, STATUS_UIDVALIDITY, &status);
		txn->uid_validity = status.uidvalidity;
	}
	count = array_count(&txn->files);
	saved = seq_range_count(&changes->saved_uids);
	if (txn->defer_uids && saved < count) {
		/* Maildir only try-locks dovecot-uidlist at commit and assigns
		   no UID when another delivery holds it. */
		txn->unseen_known = dovepush_unseen_after_commit(txn->box,
			count - saved, &txn->unseen);
		dovepush_defer(txn);
		return;
	}
	T_BEGIN {
		ARRAY(uint32_t) known;

		t_array_init(&known, 8);
		seq_range_array_iter_init(&iter, &changes->saved_uids);
		while (seq_range_array_iter_nth(&iter, n++, &uid))
			array_push_back(&known, &uid);
		/* array_front() panics on an empty array: a storage may
		   assign no UIDs at all. */
		dovepush_commit_uids(txn, txn->box->storage->user, txn->box,
			array_count(&known) == 0 ? NULL : array_front(&known),
			array_count(&known));
	} T_END;
	dovepush_txn_free(txn);
}

/* Maildir file names gain ",S=<size>,W=<vsize>" when they leave tmp/: the
   part before the first ',' is the file's identity. */
static bool dovepush_same_maildir_file(const char *a, const char *b)
{
	size_t a_len = strcspn(a, ",:"), b_len = strcspn(b, ",:");

	return a_len == b_len && strncmp(a, b, a_len) == 0;
}

/* The slow way, for what dovepush_assign_uids() cannot do: sync the mailbox
   (which waits for dovecot-uidlist's lock and assigns UIDs to every mail
   it finds without one) and look the saved mails up by storage id, newest
   first. */
static void dovepush_resolve_by_sync(struct dovepush_txn *txn,
				     struct mail_user *user, struct mailbox *box)
{
	struct mailbox_transaction_context *t;
	struct mail *mail;
	const struct dovepush_file *files;
	const char *id;
	unsigned int i, count, found = 0;
	uint32_t seq, *uids;

	files = array_get(&txn->files, &count);
	uids = t_new(uint32_t, count);
	if (mailbox_sync(box, 0) < 0) {
		e_error(user->event,
			"dovepush: mailbox_sync(%s) failed, UIDs unknown: %s",
			txn->vname, mailbox_get_last_internal_error(box, NULL));
	} else {
		t = mailbox_transaction_begin(box, 0, "dovepush uid lookup");
		mail = mail_alloc(t, 0, NULL);
		seq = mail_index_view_get_messages_count(box->view);
		for (; seq > 0 && found < count; seq--) {
			mail_set_seq(mail, seq);
			if (mail_get_special(mail, MAIL_FETCH_STORAGE_ID, &id) < 0)
				continue;
			for (i = 0; i < count; i++) {
				if (uids[i] == 0 && *files[i].base != '\0' &&
				    dovepush_same_maildir_file(files[i].base, id)) {
					uids[i] = mail->uid;
					found++;
					break;
				}
			}
		}
		mail_free(&mail);
		(void)mailbox_transaction_commit(&t);
		/* The index now has every mail: count unseen from it. */
		txn->unseen_known = FALSE;
	}
	dovepush_commit_uids(txn, user, box, uids, count);
}

/* Hand the transaction to Rust with the UIDs known at commit (0 for the
   rest): when no mail user can be had any more. */
static void dovepush_commit_unresolved(struct dovepush_txn *txn)
{
	unsigned int count = array_count(&txn->files);

	dovepush_commit_uids(txn, NULL, NULL, t_new(uint32_t, count), count);
}

static bool dovepush_uidlist_locked(const struct dovepush_txn *txn)
{
	struct stat st;

	return txn->uidlist_lock_path != NULL &&
		stat(txn->uidlist_lock_path, &st) == 0;
}

/* A mail user for resolving, looked up afresh the way lmtp looks up a
   recipient (this switches to the user's uid while it is in use). */
struct dovepush_resolver {
	char *username;
#ifndef DOVEPUSH_DOVECOT24
	/* 2.4's mail user holds its service user. */
	struct mail_storage_service_user *service_user;
#endif
	struct mail_user *user;
	uid_t old_euid;
};

static void dovepush_resolver_close(struct dovepush_resolver *r)
{
	if (r->user != NULL)
		mail_user_deinit(&r->user);
#ifndef DOVEPUSH_DOVECOT24
	if (r->service_user != NULL)
		mail_storage_service_user_unref(&r->service_user);
#endif
	i_free(r->username);
	i_set_failure_prefix("%s(%s): ", master_service_get_name(master_service),
			     my_pid);
	/* Going on as the wrong user is never safe: lmtp itself fails the
	   same way. */
	if (geteuid() != r->old_euid && seteuid(r->old_euid) < 0)
		i_fatal("dovepush: seteuid(%s) failed: %m", dec2str(r->old_euid));
}

static struct mail_user *
dovepush_resolver_user(struct dovepush_resolver *r, struct dovepush_txn *txn)
{
	struct mail_storage_service_input input;
	const char *error;

	if (r->username != NULL && strcmp(r->username, txn->username) == 0)
		return r->user;
	if (r->username != NULL)
		dovepush_resolver_close(r);
	r->username = i_strdup(txn->username);
	r->old_euid = geteuid();
	i_zero(&input);
	input.username = txn->username;
#ifdef DOVEPUSH_DOVECOT24
	input.service = master_service_get_name(master_service);
	if (mail_storage_service_lookup_next(txn->service_ctx, &input,
					     &r->user, &error) <= 0) {
#else
	input.module = input.service = master_service_get_name(master_service);
	if (mail_storage_service_lookup_next(txn->service_ctx, &input,
					     &r->service_user, &r->user,
					     &error) <= 0) {
#endif
		i_error("dovepush: cannot open mail user %s to resolve UIDs: %s",
			txn->username, error);
		r->user = NULL;
	}
	return r->user;
}

static bool dovepush_same_mailbox(const struct dovepush_txn *a,
				  const struct dovepush_txn *b)
{
	return strcmp(a->username, b->username) == 0 &&
		strcmp(a->vname, b->vname) == 0;
}

/* One try for deferred transactions of one user's mailbox, with a fresh mail
   user: one locked append for all of them. Those that must wait for the
   lock go back to *waiting; the others are handed to Rust and freed. */
static void dovepush_resolve_group(struct mail_user *user,
				   ARRAY_TYPE(dovepush_txn) *group,
				   bool give_up_waiting,
				   struct dovepush_txn **waiting)
{
	struct dovepush_txn **txns, *txn;
	struct mail_namespace *ns;
	struct mailbox *box;
	unsigned int i, count, files;
	uint32_t *uids;
	int ret = -1;

	txns = array_get_modifiable(group, &count);
	ns = mail_namespace_find(user->namespaces, txns[0]->vname);
	box = mailbox_alloc(ns->list, txns[0]->vname, 0);
	if (mailbox_open(box) < 0) {
		e_error(user->event, "dovepush: cannot open %s, UIDs unknown: %s",
			txns[0]->vname, mailbox_get_last_internal_error(box, NULL));
		for (i = 0; i < count; i++) T_BEGIN {
			dovepush_commit_unresolved(txns[i]);
		} T_END;
	} else {
		if (strcmp(box->storage->name, "maildir") == 0)
			ret = dovepush_assign_uids(box, txns, count);
		for (i = 0; i < count; i++) T_BEGIN {
			txn = txns[i];
			files = array_count(&txn->files);
			uids = t_new(uint32_t, files);
			if (ret < 0 || !dovepush_can_assign(txn)) {
				dovepush_resolve_by_sync(txn, user, box);
			} else if (ret == 0 && !give_up_waiting) {
				txn->next = *waiting;
				*waiting = txn;
				txns[i] = NULL;
			} else if (ret > 0 && dovepush_assigned_uids(box, txn, uids)) {
				dovepush_commit_uids(txn, user, box, uids, files);
			} else {
				dovepush_resolve_by_sync(txn, user, box);
			}
		} T_END;
	}
	mailbox_free(&box);
	for (i = 0; i < count; i++) {
		if (txns[i] != NULL)
			dovepush_txn_free(txns[i]);
	}
}

static void dovepush_resolve_pending(void *context ATTR_UNUSED)
{
	struct dovepush_resolver resolver;
	struct dovepush_txn *txn, *next, *rest, *waiting = NULL;
	struct dovepush_txn *const *t;
	ARRAY_TYPE(dovepush_txn) group;
	struct mail_user *user;
	bool give_up;

	i_zero(&resolver);
	i_array_init(&group, 16);
	timeout_remove(&dovepush_pending_to);
	while ((txn = dovepush_pending) != NULL) {
		/* Take every pending transaction of this user's mailbox. */
		array_clear(&group);
		give_up = FALSE;
		rest = NULL;
		for (; txn != NULL; txn = next) {
			next = txn->next;
			if (array_count(&group) > 0 &&
			    !dovepush_same_mailbox(txn, array_idx_elem(&group, 0))) {
				txn->next = rest;
				rest = txn;
				continue;
			}
			array_push_back(&group, &txn);
			if (timeval_diff_msecs(&ioloop_timeval, &txn->deferred_at) >=
			    DOVEPUSH_UID_GIVE_UP_MSECS)
				give_up = TRUE;
		}
		dovepush_pending = rest;
		txn = array_idx_elem(&group, 0);
		if (!give_up && dovepush_uidlist_locked(txn)) {
			/* Someone holds it: try again later without
			   opening anything. */
			array_foreach(&group, t) {
				(*t)->next = waiting;
				waiting = *t;
			}
			continue;
		}
		user = txn->service_ctx == NULL ? NULL :
			dovepush_resolver_user(&resolver, txn);
		if (user == NULL) {
			array_foreach(&group, t) T_BEGIN {
				dovepush_commit_unresolved(*t);
				dovepush_txn_free(*t);
			} T_END;
			continue;
		}
		dovepush_resolve_group(user, &group, give_up, &waiting);
	}
	if (resolver.username != NULL)
		dovepush_resolver_close(&resolver);
	array_free(&group);
	dovepush_pending = waiting;
	if (dovepush_pending != NULL) {
		dovepush_pending_to =
			dovepush_timeout_add_detached(DOVEPUSH_UID_RETRY_MSECS);
	}
}

/* At deinit the storage may be half gone: send what is pending with the
   UIDs known at commit. */
static void dovepush_flush_pending_unresolved(void)
{
	struct dovepush_txn *txn;

	timeout_remove(&dovepush_pending_to);
	while ((txn = dovepush_pending) != NULL) {
		dovepush_pending = txn->next;
		T_BEGIN {
			dovepush_commit_unresolved(txn);
		} T_END;
		dovepush_txn_free(txn);
	}
}

static void dovepush_txn_rollback(void *txn_ptr)
{
	struct dovepush_txn *txn = txn_ptr;

	if (txn == NULL)
		return;
	if (txn->state != NULL && txn->change)
		dovepush_cb.change_rollback(txn->state);
	else if (txn->state != NULL)
		dovepush_cb.delivery_rollback(txn->state);
	dovepush_txn_free(txn);
}

static const struct notify_vfuncs dovepush_vfuncs = {
	.mail_transaction_begin = dovepush_txn_begin,
	.mail_save = dovepush_mail_save,
	.mail_copy = dovepush_mail_copy,
	.mail_expunge = dovepush_mail_expunge,
	.mail_update_flags = dovepush_mail_update_flags,
	.mail_transaction_commit = dovepush_txn_commit,
	.mail_transaction_rollback = dovepush_txn_rollback,
};

void dovepush_shim_register(struct module *module ATTR_UNUSED,
			    const struct dovepush_callbacks *callbacks)
{
	dovepush_cb = *callbacks;
	dovepush_notify_ctx = notify_register(&dovepush_vfuncs);
}

void dovepush_shim_unregister(void)
{
	/* Deliveries still waiting for their UIDs (the process is exiting
	   right after a delivery). */
	dovepush_flush_pending_unresolved();
	if (dovepush_notify_ctx != NULL) {
#ifdef DOVEPUSH_DOVECOT24
		notify_unregister(&dovepush_notify_ctx);
#else
		notify_unregister(dovepush_notify_ctx);
		dovepush_notify_ctx = NULL;
#endif
	}
}

const char *dovepush_shim_user_name(struct mail_user *user)
{
	return user->username;
}

#ifdef DOVEPUSH_DOVECOT24
/* A typed setting's value, as text the 2.3 parser reads (see the header). */
static const char *
dovepush_setting_text(const struct dovepush_settings *set,
		      const struct setting_define *def)
{
	const void *value = CONST_PTR_OFFSET(set, def->offset);

	switch (def->type) {
	case SET_BOOL:
		return *(const bool *)value ? "yes" : "no";
	case SET_UINT:
		return dec2str(*(const unsigned int *)value);
	case SET_TIME:
		return t_strdup_printf("%us", *(const unsigned int *)value);
	case SET_TIME_MSECS:
		return t_strdup_printf("%ums", *(const unsigned int *)value);
	case SET_SIZE:
		return dec2str(*(const uoff_t *)value);
	case SET_STR:
	case SET_STR_NOVARS:
		return *(const char *const *)value;
	default:
		/* The filter array: endpoints are the service's. */
		return NULL;
	}
}

int dovepush_shim_user_settings(struct mail_user *user,
				const char *const *names,
				const char *const **pairs_r,
				const char **error_r)
{
	const struct dovepush_settings *set;
	const struct setting_define *def;
	ARRAY_TYPE(const_string) pairs;
	const char *error, *value;

	if (settings_get(user->event, &dovepush_setting_parser_info, 0,
			 &set, &error) < 0) {
		*error_r = t_strdup(error);
		return -1;
	}
	t_array_init(&pairs, 32);
	for (; *names != NULL; names++) {
		for (def = dovepush_setting_parser_info.defines;
		     def->key != NULL; def++) {
			if (strcmp(def->key, *names) != 0)
				continue;
			value = dovepush_setting_text(set, def);
			if (value != NULL) {
				value = t_strdup(value);
				array_push_back(&pairs, names);
				array_push_back(&pairs, &value);
			}
			break;
		}
	}
	settings_free(set);
	/* array_front() panics on an empty array. */
	*pairs_r = array_count(&pairs) == 0 ? NULL : array_front(&pairs);
	return (int)array_count(&pairs) / 2;
}
#else
int dovepush_shim_user_settings(struct mail_user *user,
				const char *const *names,
				const char *const **pairs_r,
				const char **error_r ATTR_UNUSED)
{
	ARRAY_TYPE(const_string) pairs;
	const char *value;

	t_array_init(&pairs, 32);
	for (; *names != NULL; names++) {
		value = mail_user_plugin_getenv(user, *names);
		if (value != NULL) {
			array_push_back(&pairs, names);
			array_push_back(&pairs, &value);
		}
	}
	/* array_front() panics on an empty array. */
	*pairs_r = array_count(&pairs) == 0 ? NULL : array_front(&pairs);
	return (int)array_count(&pairs) / 2;
}
#endif

const char *dovepush_shim_user_base_dir(struct mail_user *user)
{
	return user->set->base_dir;
}

bool dovepush_shim_user_mail_debug(struct mail_user *user)
{
#ifdef DOVEPUSH_DOVECOT24
	return user->set->mail_debug;
#else
	return user->mail_debug;
#endif
}

const char *dovepush_shim_mailbox_vname(struct mailbox *box)
{
	return mailbox_get_vname(box);
}

int dovepush_shim_server_metadata(struct mailbox *box, const char *key,
				  const char **value_r, const char **error_r)
{
	struct mailbox *inbox = box;
	struct mail_namespace *ns;
	struct mail_attribute_value value;
	const char *full_key;
	int ret;

	*value_r = NULL;
	*error_r = NULL;
	if (!box->inbox_user) {
		ns = mail_namespace_find_inbox(box->storage->user->namespaces);
		if (ns == NULL) {
			*error_r = "user has no INBOX namespace";
			return -1;
		}
		inbox = mailbox_alloc(ns->list, "INBOX", MAILBOX_FLAG_READONLY);
	}
	full_key = t_strconcat(MAILBOX_ATTRIBUTE_PREFIX_DOVECOT_PVT_SERVER,
			       key, NULL);
	i_zero(&value);
	ret = mailbox_attribute_get(inbox, MAIL_ATTRIBUTE_TYPE_PRIVATE,
				    full_key, &value);
	if (ret < 0)
		*error_r = t_strdup(mailbox_get_last_internal_error(inbox, NULL));
	else if (ret > 0)
		*value_r = t_strdup(value.value);
	if (inbox != box)
		mailbox_free(&inbox);
	return ret;
}

int dovepush_shim_mailbox_unseen(struct mailbox *box, uint32_t *unseen_r,
				 const char **error_r)
{
	struct mail_index_view *view;
	const struct mail_index_header *hdr;

	*unseen_r = 0;
	if (box->index == NULL) {
		*error_r = "mailbox index not open";
		return -1;
	}
	if (mail_index_refresh(box->index) < 0) {
#ifdef DOVEPUSH_DOVECOT24
		*error_r = t_strdup(mail_index_get_last_error(box->index, NULL));
#else
		*error_r = t_strdup(mail_index_get_error_message(box->index));
#endif
		return -1;
	}
	view = mail_index_view_open(box->index);
	hdr = mail_index_get_header(view);
	*unseen_r = hdr->messages_count - hdr->seen_messages_count;
	mail_index_view_close(&view);
	return 0;
}

void dovepush_shim_log(struct mail_user *user, int level, const char *message)
{
	struct event *event = user != NULL ? user->event : NULL;

	if (event == NULL) {
		switch (level) {
		case DOVEPUSH_LOG_DEBUG: i_debug("dovepush: %s", message); break;
		case DOVEPUSH_LOG_INFO: i_info("dovepush: %s", message); break;
		case DOVEPUSH_LOG_WARNING: i_warning("dovepush: %s", message); break;
		default: i_error("dovepush: %s", message); break;
		}
		return;
	}
	switch (level) {
	case DOVEPUSH_LOG_DEBUG: e_debug(event, "dovepush: %s", message); break;
	case DOVEPUSH_LOG_INFO: e_info(event, "dovepush: %s", message); break;
	case DOVEPUSH_LOG_WARNING: e_warning(event, "dovepush: %s", message); break;
	default: e_error(event, "dovepush: %s", message); break;
	}
}
