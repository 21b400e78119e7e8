/* dovepush's settings, declared the Dovecot 2.4 way (typed, global, with
 * named "dovepush <name> { ... }" blocks for several endpoints). Compiled
 * into the plugin, which reads them with settings_get(), and into the
 * settings module (dovepush-settings-module.c) that Dovecot's config process
 * and doveconf load from $moduledir/settings/, so that they know the names
 * and types: a misspelt dovepush_* setting is then a config error at start,
 * and doveconf -n shows them.
 *
 * The names and meanings are the 2.3 ones (plugin {}), so that the Rust side
 * parses both alike (dovepush-settings); only the syntax is 2.4's: times and
 * sizes take units, booleans are yes/no. DOVEPUSH_STATE_DIR comes from the
 * build (dovecot-config's dovecot_statedir). */
#include "lib.h"
#include "array.h"
#include "settings-parser.h"
#include "http-url.h"

#include "dovepush-settings.h"

#ifndef DOVEPUSH_STATE_DIR
#  define DOVEPUSH_STATE_DIR "/var/lib/dovecot"
#endif

static bool dovepush_settings_check(void *set, pool_t pool, const char **error_r);

/* The event kinds dovepush_events may name (dovepush-protocol's EventKind). */
static const char *const dovepush_event_names[] = {
	"messageNew", "messageRead", "messageExpunge", "messageAppend", NULL
};

#undef DEF
#define DEF(type, name) \
	SETTING_DEFINE_STRUCT_##type(#name, name, struct dovepush_settings)

static const struct setting_define dovepush_setting_defines[] = {
	DEF(STR_NOVARS, dovepush_name),
	DEF(STR_NOVARS, dovepush_url),
	DEF(UINT, dovepush_max_retries),
	DEF(TIME_MSECS, dovepush_timeout_msecs),
	DEF(BOOL, dovepush_user_from_metadata),
	DEF(BOOL, dovepush_batch),
	DEF(STR_NOVARS, dovepush_events),
	{
		.type = SET_FILTER_ARRAY,
		.key = DOVEPUSH_SETTINGS_FILTER_NAME,
		.offset = offsetof(struct dovepush_settings, dovepush),
		.filter_array_field_name = "dovepush_name",
	},
	DEF(TIME_MSECS, dovepush_cache_lifetime),
	DEF(TIME_MSECS, dovepush_negative_cache_lifetime),
	DEF(STR_NOVARS, dovepush_mailboxes),
	DEF(UINT, dovepush_queue_size),
	DEF(STR_NOVARS, dovepush_spool_dir),
	DEF(SIZE, dovepush_spool_max_size),
	DEF(TIME, dovepush_spool_max_age),
	DEF(TIME, dovepush_spool_retry_interval),
	DEF(BOOL, dovepush_debug),

	SETTING_DEFINE_LIST_END,
};

/* The defaults of dovepush-settings (settings/src/lib.rs); the 2.4 tests
   compare them through doveconf. */
static const struct dovepush_settings dovepush_default_settings = {
	.dovepush_name = "",
	.dovepush_url = "",
	.dovepush_max_retries = 1,
	.dovepush_timeout_msecs = 2000,
	.dovepush_user_from_metadata = FALSE,
	.dovepush_batch = FALSE,
	.dovepush_events = "messageNew",
	.dovepush = ARRAY_INIT,
	.dovepush_cache_lifetime = 60 * 1000,
	.dovepush_negative_cache_lifetime = 5 * 1000,
	.dovepush_mailboxes = "INBOX",
	.dovepush_queue_size = 10000,
	.dovepush_spool_dir = DOVEPUSH_STATE_DIR"/dovepush-spool",
	.dovepush_spool_max_size = 256 * 1024 * 1024,
	.dovepush_spool_max_age = 2 * 24 * 3600,
	.dovepush_spool_retry_interval = 30,
	.dovepush_debug = FALSE,
};

const struct setting_parser_info dovepush_setting_parser_info = {
	.name = "dovepush",
	.plugin_dependency = "lib20_dovepush_plugin",

	.defines = dovepush_setting_defines,
	.defaults = &dovepush_default_settings,

	.struct_size = sizeof(struct dovepush_settings),
	.pool_offset1 = 1 + offsetof(struct dovepush_settings, pool),
	.check_func = dovepush_settings_check,
};

/* Runs in the config process (a bad value fails the config at start, naming
   the setting) and at each settings_get(). */
/* dovepush_events: names separated by spaces or commas, each a known event
   kind, at least one. */
static bool dovepush_events_check(const char *value, const char **error_r)
{
	const char *const *names, *const *known;
	unsigned int count = 0;

	names = t_strsplit_spaces(value, " ,\t");
	for (; *names != NULL; names++) {
		for (known = dovepush_event_names; *known != NULL; known++) {
			if (strcmp(*known, *names) == 0)
				break;
		}
		if (*known == NULL) {
			*error_r = t_strdup_printf("dovepush_events: unknown event "
				"\"%s\" (expected messageNew, messageRead, "
				"messageExpunge or messageAppend)", *names);
			return FALSE;
		}
		count++;
	}
	if (count == 0) {
		*error_r = "dovepush_events: no event named (expected "
			"messageNew, messageRead, messageExpunge or "
			"messageAppend)";
		return FALSE;
	}
	return TRUE;
}

static bool dovepush_settings_check(void *_set, pool_t pool,
				    const char **error_r)
{
	struct dovepush_settings *set = _set;
	struct http_url *url;
	const char *error;

	if (set->dovepush_url[0] != '\0') {
		if (!str_begins_with(set->dovepush_url, "http://") &&
		    !str_begins_with(set->dovepush_url, "https://")) {
			/* Not the value: it may carry a password. */
			*error_r = "dovepush_url: only http:// and https:// "
				"URLs are supported";
			return FALSE;
		}
		if (http_url_parse(set->dovepush_url, NULL,
				   HTTP_URL_ALLOW_USERINFO_PART, pool, &url,
				   &error) < 0) {
			*error_r = t_strdup_printf("dovepush_url: %s", error);
			return FALSE;
		}
	}
	if (!dovepush_events_check(set->dovepush_events, error_r))
		return FALSE;
	if (set->dovepush_timeout_msecs == 0) {
		*error_r = "dovepush_timeout_msecs must not be 0";
		return FALSE;
	}
	if (set->dovepush_spool_retry_interval == 0) {
		*error_r = "dovepush_spool_retry_interval must not be 0";
		return FALSE;
	}
	if (set->dovepush_queue_size == 0) {
		*error_r = "dovepush_queue_size must not be 0";
		return FALSE;
	}
	return TRUE;
}
