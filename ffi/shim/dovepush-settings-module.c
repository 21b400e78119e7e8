/* The settings module for Dovecot 2.4 (libdovepush_settings.so, installed in
 * $moduledir/settings/): the config process and doveconf load every module
 * there and take the settings it declares from <module>_set_infos, so that
 * dovepush_* settings are known (a misspelt one fails the config check) and
 * reach the mail processes in the binary config. Nothing here runs: the
 * module is data plus the check function of dovepush-settings.c. Linked by
 * ffi/build.rs with the C compiler alone (no Rust runtime in the config
 * process). */
#include "lib.h"
#include "settings-parser.h"

#include "dovepush-settings.h"

/* The loader refuses a module whose version is not its ABI version. */
extern const char *dovepush_settings_version;
extern const struct setting_parser_info *dovepush_settings_set_infos[];

const char *dovepush_settings_version = DOVECOT_ABI_VERSION;

const struct setting_parser_info *dovepush_settings_set_infos[] = {
	&dovepush_setting_parser_info,
	NULL
};
