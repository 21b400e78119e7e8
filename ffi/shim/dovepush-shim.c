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

#include "dovepush-shim.h"

/* Per-transaction state, one per notify transaction that is a delivery. */
struct dovepush_txn {
	struct mailbox *box;
	void *state;        /* Rust's, NULL when not of interest */
	bool decided;
};

static struct notify_context *dovepush_notify_ctx;
static struct dovepush_callbacks dovepush_cb;

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
		if (txn->state != NULL) {
			/* Ask the storage to assign UIDs at commit (Maildir
			   otherwise only try-locks dovecot-uidlist and may
			   assign none): an app cannot open UID 0. */
			mail->transaction->flags |=
				MAILBOX_TRANSACTION_FLAG_ASSIGN_UIDS;
		}
	}
	if (txn->state == NULL)
		return;

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
		commit.uids = array_front(&uids);
		commit.uid_count = array_count(&uids);
		dovepush_cb.delivery_commit(txn->state, txn->box->storage->user,
					     txn->box, &commit);
	} T_END;
	i_free(txn);
}

static void dovepush_txn_rollback(void *txn_ptr)
{
	struct dovepush_txn *txn = txn_ptr;

	if (txn == NULL)
		return;
	if (txn->state != NULL)
		dovepush_cb.delivery_rollback(txn->state);
	i_free(txn);
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
