/* dovepush's typed settings for Dovecot 2.4 (see dovepush-settings.c).
 * Dovecot 2.3 has no typed settings: there the plugin reads plugin {}. */
#ifndef DOVEPUSH_SETTINGS_H
#define DOVEPUSH_SETTINGS_H

#include "settings-parser.h"

/* The filter array of named endpoints: dovepush <name> { url = ... } */
#define DOVEPUSH_SETTINGS_FILTER_NAME "dovepush"

/* Field names are the setting names (DEF() in dovepush-settings.c relies on
   it), so that a key is found by its name in dovepush_setting_parser_info's
   defines and its value read at that define's offset. */
struct dovepush_settings {
	pool_t pool;

	/* The endpoint(s): the sender service's alone. */
	const char *dovepush_name;
	const char *dovepush_url;
	unsigned int dovepush_max_retries;
	unsigned int dovepush_timeout_msecs;
	bool dovepush_user_from_metadata;
	bool dovepush_batch;
	const char *dovepush_events;
	ARRAY_TYPE(const_string) dovepush;

	/* The plugin's. */
	unsigned int dovepush_cache_lifetime;
	unsigned int dovepush_negative_cache_lifetime;
	const char *dovepush_mailboxes;
	unsigned int dovepush_queue_size;

	/* Both. */
	const char *dovepush_spool_dir;
	uoff_t dovepush_spool_max_size;
	unsigned int dovepush_spool_max_age;
	unsigned int dovepush_spool_retry_interval;
	bool dovepush_debug;
};

extern const struct setting_parser_info dovepush_setting_parser_info;

#endif
