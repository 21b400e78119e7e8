//! `dovepush-sender`: started by Dovecot's master as `service dovepush` (see
//! `conf.d/90-dovepush.conf`); everything is in the library.

fn main() {
    std::process::exit(dovepush_sender::service::main());
}
