/* See include/dovepush-shim.h. Compiled with Dovecot's own include flags. */
#include "lib.h"
#include "array.h"
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

#include <unistd.h>

#include "dovepush-shim.h"

/* Per-transaction state, one per notify transaction that is a delivery. */
struct dovepush_txn {
	struct mailbox *box;
	void *state;        /* Rust's, NULL when not of interest */
	bool decided;
	/* In lmtp, UIDs the storage did not assign at commit are resolved
	   after the reply (see dovepush_defer()): the saved mails' storage
	   ids, in save order. */
	bool defer_uids;
	pool_t pool;
	ARRAY_TYPE(const_string) storage_ids;

	/* Set while waiting for deferred UID resolution. */
	struct dovepush_txn *next;
	struct mail_storage_service_user *service_user;
	uid_t euid;
	const char *vname;
	uint32_t uid_validity;
};

static struct notify_context *dovepush_notify_ctx;
static struct dovepush_callbacks dovepush_cb;
static struct dovepush_txn *dovepush_pending;
static struct timeout *dovepush_pending_to;

static void dovepush_txn_free(struct dovepush_txn *txn)
{
	pool_unref(&txn->pool);
	i_free(txn);
}

/* Can missing UIDs be resolved after the delivery is answered? Only in lmtp,
   whose ioloop runs on after each DATA reply; dovecot-lda exits instead. */
static bool dovepush_can_defer(void)
{
	return current_ioloop != NULL && master_service != NULL &&
		strcmp(master_service_get_name(master_service), "lmtp") == 0;
}

static void *dovepush_txn_begin(struct mailbox_transaction_context *t)
{
	struct dovepush_txn *txn;

	/* Only MTA deliveries (lda, lmtp, sieve keep/fileinto) open their
	   mailbox with POST_SESSION: the same test as the push_notification
	   plugin's MessageNew. Everything else costs nothing. */
	if ((t->box->flags & MAILBOX_FLAG_POST_SESSION) == 0)
		return NULL;
	txn = i_new(struct dovepush_txn, 1);
	txn->box = t->box;
	txn->pool = pool_alloconly_create("dovepush txn", 512);
	p_array_init(&txn->storage_ids, txn->pool, 4);
	return txn;
}

static void dovepush_mail_save(void *txn_ptr, struct mail *mail)
{
	struct dovepush_txn *txn = txn_ptr;
	struct dovepush_saved_mail facts;
	const char *value;

	if (txn == NULL)
		return;
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
	   and is how dovepush_resolve() finds the mail again. Other storages
	   lock at commit and always assign UIDs. */
	if (strcmp(mail->box->storage->name, "maildir") != 0 ||
	    mail_get_special(mail, MAIL_FETCH_STORAGE_ID, &value) < 0)
		value = "";
	value = p_strdup(txn->pool, value);
	array_push_back(&txn->storage_ids, &value);

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

static void dovepush_resolve_pending(void *context ATTR_UNUSED);

/* Keep the transaction's facts until the ioloop runs again (after lmtp has
   written its reply), then find the UIDs with a fresh mail user (lmtp
   requires its own to be gone by then). */
static void dovepush_defer(struct dovepush_txn *txn, uint32_t uid_validity)
{
	txn->service_user = txn->box->storage->user->_service_user;
	if (txn->service_user != NULL)
		mail_storage_service_user_ref(txn->service_user);
	txn->euid = geteuid();
	txn->vname = p_strdup(txn->pool, mailbox_get_vname(txn->box));
	txn->uid_validity = uid_validity;
	txn->box = NULL;
	txn->next = dovepush_pending;
	dovepush_pending = txn;
	if (dovepush_pending_to == NULL) {
		dovepush_pending_to =
			timeout_add_short(0, dovepush_resolve_pending, NULL);
	}
}

static void
dovepush_txn_commit(void *txn_ptr, struct mail_transaction_commit_changes *changes)
{
	struct dovepush_txn *txn = txn_ptr;
	struct dovepush_commit commit;
	struct seq_range_iter iter;
	ARRAY(uint32_t) uids;
	unsigned int n = 0;
	uint32_t uid;

	if (txn == NULL)
		return;
	if (txn->state != NULL && txn->defer_uids &&
	    seq_range_count(&changes->saved_uids) < array_count(&txn->storage_ids)) {
		uint32_t uid_validity = changes->uid_validity;
		if (uid_validity == 0) {
			struct mailbox_status status;
			mailbox_get_open_status(txn->box, STATUS_UIDVALIDITY,
						&status);
			uid_validity = status.uidvalidity;
		}
		dovepush_defer(txn, uid_validity);
		return;
	}
	if (txn->state != NULL) T_BEGIN {
		i_zero(&commit);
		commit.uid_validity = changes->uid_validity;
		if (commit.uid_validity == 0) {
			struct mailbox_status status;
			mailbox_get_open_status(txn->box, STATUS_UIDVALIDITY,
						&status);
			commit.uid_validity = status.uidvalidity;
		}
		t_array_init(&uids, 8);
		seq_range_array_iter_init(&iter, &changes->saved_uids);
		while (seq_range_array_iter_nth(&iter, n++, &uid))
			array_push_back(&uids, &uid);
		/* array_front() panics on an empty array: a storage may
		   assign no UIDs at all. */
		commit.uid_count = array_count(&uids);
		commit.uids = commit.uid_count == 0 ? NULL : array_front(&uids);
		dovepush_cb.delivery_commit(txn->state, txn->box->storage->user,
					     txn->box, &commit);
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

/* Sync a fresh instance of the mailbox (which assigns UIDs to every mail it
   finds without one) and look the saved mails up by storage id, newest
   first. */
static void dovepush_resolve(struct dovepush_txn *txn, struct mail_user *user)
{
	struct mail_namespace *ns;
	struct mailbox *box;
	struct mailbox_transaction_context *t;
	struct mail *mail;
	struct dovepush_commit commit;
	const char *const *ids;
	const char *id;
	unsigned int i, count, found = 0;
	uint32_t seq, *uids;

	ids = array_get(&txn->storage_ids, &count);
	uids = t_new(uint32_t, count);
	ns = mail_namespace_find(user->namespaces, txn->vname);
	box = mailbox_alloc(ns->list, txn->vname, 0);
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
				if (uids[i] == 0 && *ids[i] != '\0' &&
				    dovepush_same_maildir_file(ids[i], id)) {
					uids[i] = mail->uid;
					found++;
					break;
				}
			}
		}
		mail_free(&mail);
		(void)mailbox_transaction_commit(&t);
	}
	i_zero(&commit);
	commit.uid_validity = txn->uid_validity;
	commit.uids = uids;
	commit.uid_count = count;
	dovepush_cb.delivery_commit(txn->state, user, box, &commit);
	mailbox_free(&box);
}

/* Hand the transaction to Rust with the UIDs known at commit (0 for the
   rest): when no mail user can be had any more. */
static void dovepush_commit_unresolved(struct dovepush_txn *txn)
{
	struct dovepush_commit commit;

	i_zero(&commit);
	commit.uid_validity = txn->uid_validity;
	commit.uid_count = array_count(&txn->storage_ids);
	commit.uids = t_new(uint32_t, commit.uid_count);
	dovepush_cb.delivery_commit(txn->state, NULL, NULL, &commit);
}

static void dovepush_resolve_pending(void *context ATTR_UNUSED)
{
	struct mail_storage_service_ctx *service_ctx;
	struct dovepush_txn *txn;
	struct mail_user *user;
	const char *error;
	uid_t old_euid;

	timeout_remove(&dovepush_pending_to);
	while ((txn = dovepush_pending) != NULL) {
		dovepush_pending = txn->next;
		old_euid = geteuid();
		T_BEGIN {
			service_ctx = txn->service_user == NULL ? NULL :
				mail_storage_service_user_get_service_ctx(
					txn->service_user);
			/* Like lmtp's own delivery: this switches to the
			   mail user's uid while the user is in use. */
			if (service_ctx == NULL) {
				dovepush_commit_unresolved(txn);
			} else if (mail_storage_service_next(service_ctx,
					txn->service_user, &user, &error) < 0) {
				i_error("dovepush: cannot open the mail user "
					"to resolve UIDs: %s", error);
				dovepush_commit_unresolved(txn);
			} else {
				dovepush_resolve(txn, user);
				mail_user_deinit(&user);
			}
		} T_END;
		i_set_failure_prefix("%s(%s): ",
				     master_service_get_name(master_service),
				     my_pid);
		/* Going on as the wrong user is never safe: lmtp itself
		   fails the same way. */
		if (geteuid() != old_euid && seteuid(old_euid) < 0)
			i_fatal("dovepush: seteuid(%s) failed: %m",
				dec2str(old_euid));
		if (txn->service_user != NULL)
			mail_storage_service_user_unref(&txn->service_user);
		dovepush_txn_free(txn);
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
		if (txn->service_user != NULL)
			mail_storage_service_user_unref(&txn->service_user);
		dovepush_txn_free(txn);
	}
}

static void dovepush_txn_rollback(void *txn_ptr)
{
	struct dovepush_txn *txn = txn_ptr;

	if (txn == NULL)
		return;
	if (txn->state != NULL)
		dovepush_cb.delivery_rollback(txn->state);
	dovepush_txn_free(txn);
}

static const struct notify_vfuncs dovepush_vfuncs = {
	.mail_transaction_begin = dovepush_txn_begin,
	.mail_save = dovepush_mail_save,
	.mail_copy = dovepush_mail_copy,
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
		notify_unregister(dovepush_notify_ctx);
		dovepush_notify_ctx = NULL;
	}
}

const char *dovepush_shim_user_name(struct mail_user *user)
{
	return user->username;
}

const char *dovepush_shim_user_setting(struct mail_user *user, const char *name)
{
	return mail_user_plugin_getenv(user, name);
}

bool dovepush_shim_user_mail_debug(struct mail_user *user)
{
	return user->mail_debug;
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
		*error_r = t_strdup(mail_index_get_error_message(box->index));
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
