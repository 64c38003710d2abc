// A TCP lookup service on standalone Asio coroutines whose lookups go through a microbatch Batcher,
// with its load generator and the checks of its robustness against a live server (issue 12).
//
//   asio_server serve [--port P] [--mode batched|direct] [--idle-timeout-ms T] [--db-connections C]
//                     [--max-connections M] [--metrics-port Q]
//       listens on 127.0.0.1:P (0, the default: a free port), prints "port <P>" as its first line, serves
//       until SIGINT or SIGTERM, then answers what it has read, prints one "stopped ..." line, exits 0.
//       With --metrics-port (batched mode; 0: a free port) it also serves the batcher's Stats over HTTP
//       at http://127.0.0.1:Q/metrics (the Prometheus text format) and prints "metrics_port <Q>" second
//   asio_server load --port P --connections N --seconds S [--keys mixed|present]
//       N connections, each a closed loop of GETs for S seconds; checks every answer (keys `present`:
//       only keys the table has, so that every answer is a completed job); prints one line:
//       connections=N requests=R seconds=S requests_per_s=X p50_us=Y p99_us=Z table_calls_per_request=C wrong=0
//   asio_server check --port P --idle-timeout-ms T [--max-connections M]
//       answers, pipelining, ERR lines, idle timeout, clients that vanish with requests in flight,
//       the connection limit (when M is given: the server's --max-connections)
//   asio_server stop --port P --pid PID --signal TERM|INT
//       sends the signal with requests in flight; checks they are answered, then the connection closes
//
// Protocol: one request per line (LF, a CR before it is ignored), at most 1024 bytes before the LF.
//   GET <key>   ->  the value, or NOT_FOUND        key: 1 to 64 characters of [A-Za-z0-9_:-]
//   STATS       ->  STATS name=number ...           the server's counters (the checks read them)
//   otherwise   ->  ERR line too long | ERR unknown command | ERR malformed key; the connection stays usable
// Requests may be pipelined (up to 32 unanswered per connection; beyond that the server stops reading
// that connection until it catches up); answers come back in request order.
//
// The table stands in for a database: key0..key99999 -> value0..value99999 in memory, and every call
// costs 100 us + 1 us per key, slept (not spun: a round trip waits for another machine, it does not burn
// the service's CPU, and on a 2-core machine spinning would measure CPU contention with the load
// generator instead). A call returns rows only for the keys it has, as `SELECT ... WHERE key = ANY($1)`
// would; in batched mode a key without a row ends its job with microbatch::no_result: NOT_FOUND.
//
// The two modes are made comparable: the same table and the same number of table calls at once (the
// "connection pool", --db-connections, default 4), and both hop from the I/O thread to a worker thread
// and back. `direct`: one table call per request, posted to a pool of that many threads. `batched`:
// every request is a job of one Batcher with max_concurrent_batches = that many, dispatch_when_idle
// (a batch goes as soon as a call slot is free: a lone client waits for no timer, and batches grow only
// while every slot is busy) and DuplicateIds::coalesce (two clients asking for one key in one batch
// share one row). One I/O thread runs every connection: per connection a reader coroutine (reads
// lines, starts lookups), a writer coroutine (sends the answers in order) and an idle watchdog.
//
// Untrusted input: a line over 1 KiB gets one `ERR line too long` and the rest of it up to its LF is
// skipped; a connection that sends no complete line for --idle-timeout-ms (default 30000) gets
// `ERR idle timeout` and is closed; a client that goes away with requests in flight has its queued jobs
// cancelled (terminal cancellation through the completion token's slot) and their answers dropped;
// connections over --max-connections (default 1024) get `ERR too many connections` and are closed.
// SIGINT / SIGTERM: stop accepting, stop reading, answer every request already read (the batcher keeps
// running until they are done), close (after 5 s, whatever is left is dropped), shut the batcher down.

// Asio 1.22 looks for <experimental/coroutine> before it enables co_await under clang; libstdc++ (and a
// recent libc++) have only <coroutine>, which clang 14 supports.
#if defined(__clang__) && !defined(ASIO_HAS_CO_AWAIT) && __has_include(<coroutine>)
#define ASIO_HAS_CO_AWAIT 1
#endif

#include <microbatch/asio.hpp>
#include <microbatch/metrics.hpp>

#include <asio.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>

#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

using tcp = asio::ip::tcp;
using clock_type = std::chrono::steady_clock;
using namespace std::chrono_literals;
using namespace asio::experimental::awaitable_operators;
using asio::awaitable;
constexpr auto use_nothrow = asio::experimental::as_tuple(asio::use_awaitable); // errors as values

constexpr std::size_t max_line = 1024;    // bytes of a request line before its LF
constexpr std::size_t max_key = 64;       // characters of a key
constexpr std::size_t max_in_flight = 32; // unanswered requests per connection before it is not read
constexpr std::uint64_t table_rows = 100000;
constexpr auto drain_timeout = 5s;  // at SIGINT/SIGTERM: how long connections get to finish
constexpr auto linger_timeout = 1s; // after our last answer: how long to wait for the client's EOF

// ------------------------------------------------------------------------------------------------
// The table

struct Lookup {
  std::string key;
};
struct Row {
  std::string key;
  std::string value;
};

/// key<i> -> value<i> for i < table_rows. Read-only after construction, so calls may run at once on
/// several threads. Every call costs 100 us + 1 us per key (slept; see the top of the file).
class table {
public:
  table() {
    rows_.reserve(table_rows);
    for (std::uint64_t i = 0; i < table_rows; ++i)
      rows_.emplace("key" + std::to_string(i), "value" + std::to_string(i));
  }

  std::vector<Row> lookup(std::span<const Lookup> keys) const {
    const auto start = clock_type::now();
    std::vector<Row> found;
    found.reserve(keys.size());
    for (const Lookup& wanted : keys)
      if (auto it = rows_.find(wanted.key); it != rows_.end()) found.push_back({it->first, it->second});
    precise_sleep_until(start + 100us + 1us * keys.size());
    calls_.fetch_add(1, std::memory_order_relaxed);
    keys_.fetch_add(keys.size(), std::memory_order_relaxed);
    busy_ns_.fetch_add(std::uint64_t((clock_type::now() - start) / 1ns), std::memory_order_relaxed);
    return found;
  }

  std::uint64_t calls() const { return calls_.load(); }
  std::uint64_t keys() const { return keys_.load(); }
  double mean_call_us() const { return calls() == 0 ? 0 : double(busy_ns_.load()) / 1000.0 / double(calls()); }

private:
  // Linux lets a sleeping thread wake up to 50 us late by default (timer slack); that would add half
  // the modelled round trip to every call. One nanosecond of slack makes the cost what it says.
  static void precise_sleep_until(clock_type::time_point until) {
    thread_local const bool precise = [] { return ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL) == 0; }();
    (void)precise;
    std::this_thread::sleep_until(until);
  }

  std::unordered_map<std::string, std::string> rows_;
  mutable std::atomic<std::uint64_t> calls_{0}, keys_{0}, busy_ns_{0};
};

/// The batch processor: one table call for the whole batch.
struct table_processor {
  const table* db;
  std::vector<Row> operator()(std::span<Lookup> jobs) const { return db->lookup(jobs); }
};
using lookup_batcher = microbatch::Batcher<Lookup, Row, table_processor>;

bool valid_key(std::string_view key) {
  return !key.empty() && key.size() <= max_key && std::all_of(key.begin(), key.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == ':' ||
           c == '-';
  });
}

// ------------------------------------------------------------------------------------------------
// The server

/// Wakes the one coroutine waiting on it. Everything runs on the one I/O thread, so nothing can happen
/// between a waiter's check of its condition and its wait: no wake-up is lost.
class wakeup {
public:
  explicit wakeup(const asio::any_io_executor& executor) : timer_(executor) {}
  awaitable<void> wait() {
    timer_.expires_at(clock_type::time_point::max());
    co_await timer_.async_wait(use_nothrow);
  }
  void notify() { timer_.cancel(); }

private:
  asio::steady_timer timer_;
};

/// One request's answer, in its connection's queue until it is written.
struct reply {
  std::string text; // without the LF
  bool ready = false;
  asio::cancellation_signal cancel;   // batched: cancels the job if the client goes away
  std::atomic<bool> abandoned{false}; // direct: the pool skips the call if the client went away
};

/// Counters, touched on the I/O thread only.
struct counters {
  std::uint64_t accepted = 0, refused = 0, requests = 0, errors_sent = 0, lookups_started = 0, lookups_ended = 0,
                answers_dropped = 0, idle_closed = 0;
};

class connection;

class server {
public:
  struct config {
    unsigned short port = 0;
    bool batched = true;
    std::chrono::milliseconds idle_timeout{30000};
    std::size_t db_connections = 4;
    std::size_t max_connections = 1024;
    std::optional<unsigned short> metrics_port; // batched mode only
  };

  server(asio::io_context& io, const config& cfg)
      : io_(io), cfg_(cfg), acceptor_(io, tcp::endpoint(asio::ip::address_v4::loopback(), cfg.port)),
        signals_(io, SIGINT, SIGTERM), drain_timer_(io) {
    if (cfg.metrics_port)
      metrics_acceptor_.emplace(io, tcp::endpoint(asio::ip::address_v4::loopback(), *cfg.metrics_port));
    if (cfg.batched) {
      batcher_.emplace(table_processor{&db_}, &Lookup::key, &Row::key,
                       microbatch::Options{.max_batch_size = 256,
                                           .max_concurrent_batches = cfg.db_connections,
                                           .dispatch_when_idle = true,
                                           .duplicate_ids = microbatch::DuplicateIds::coalesce});
    } else {
      pool_.emplace(cfg.db_connections);
    }
  }

  unsigned short port() const { return acceptor_.local_endpoint().port(); }
  std::optional<unsigned short> metrics_port() const {
    if (!metrics_acceptor_) return std::nullopt;
    return metrics_acceptor_->local_endpoint().port();
  }
  std::chrono::milliseconds idle_timeout() const { return cfg_.idle_timeout; }
  counters& count() { return count_; }

  void start() {
    asio::co_spawn(io_, accept_loop(), rethrow);
    if (metrics_acceptor_) asio::co_spawn(io_, metrics_loop(), rethrow);
    signals_.async_wait([this](asio::error_code error, int signal_number) {
      if (!error) stop(signal_number);
    });
  }

  /// After io.run() returned: every connection is closed and every lookup has ended.
  void finish() {
    if (batcher_) batcher_->shutdown(); // nothing is left to drain by now; joins its threads
    if (pool_) pool_->join();
    std::printf("stopped on %s: accepted=%llu requests=%llu lookups_started=%llu lookups_ended=%llu "
                "answers_dropped=%llu table_calls=%llu table_keys=%llu mean_call_us=%.1f\n",
                stop_signal_ == SIGINT ? "SIGINT" : "SIGTERM", ull(count_.accepted), ull(count_.requests),
                ull(count_.lookups_started), ull(count_.lookups_ended), ull(count_.answers_dropped), ull(db_.calls()),
                ull(db_.keys()), db_.mean_call_us());
  }

  /// A GET: the answer arrives later, on the I/O thread, through `connection::answer`.
  void start_lookup(const std::shared_ptr<connection>& c, const std::shared_ptr<reply>& r, std::string key);

  /// The client went away: its lookup need not run (batched: a queued job leaves the batcher with
  /// microbatch::cancelled; one already in the table runs on, and its answer is dropped).
  void abandon(reply& r) {
    r.abandoned = true;
    r.cancel.emit(asio::cancellation_type::terminal);
  }

  std::string stats_line() const {
    std::string line = "STATS connections=" + std::to_string(connections_.size());
    auto add = [&line](const char* name, std::uint64_t value) {
      line += ' ';
      line += name;
      line += '=';
      line += std::to_string(value);
    };
    add("accepted", count_.accepted);
    add("refused", count_.refused);
    add("requests", count_.requests);
    add("errors_sent", count_.errors_sent);
    add("lookups_started", count_.lookups_started);
    add("lookups_ended", count_.lookups_ended);
    add("answers_dropped", count_.answers_dropped);
    add("idle_closed", count_.idle_closed);
    add("table_calls", db_.calls());
    add("table_keys", db_.keys());
    if (batcher_) {
      const microbatch::Stats s = batcher_->stats();
      add("jobs_submitted", s.jobs_submitted);
      add("jobs_completed", s.jobs_completed);
      add("jobs_failed", s.jobs_failed);
      add("jobs_cancelled", s.jobs_cancelled);
      add("jobs_coalesced", s.jobs_coalesced);
      add("pending_jobs", s.pending_jobs);
      add("batches", s.batches);
    }
    return line;
  }

  void forget(connection* c);

private:
  static unsigned long long ull(std::uint64_t v) { return v; }
  static void rethrow(std::exception_ptr error) {
    if (error) std::rethrow_exception(error); // a bug, not a client's doing: let run() throw
  }

  awaitable<void> accept_loop();
  awaitable<void> metrics_loop();
  awaitable<void> serve_metrics(std::shared_ptr<tcp::socket> socket);
  void stop(int signal_number);

  asio::io_context& io_;
  config cfg_;
  table db_;
  std::optional<lookup_batcher> batcher_; // batched mode
  std::optional<asio::thread_pool> pool_; // direct mode
  tcp::acceptor acceptor_;
  asio::signal_set signals_;
  asio::steady_timer drain_timer_;
  std::set<connection*> connections_;
  std::optional<tcp::acceptor> metrics_acceptor_;          // with --metrics-port
  std::set<std::shared_ptr<tcp::socket>> metrics_sockets_; // open HTTP connections, closed at stop
  counters count_;
  bool stopping_ = false;
  int stop_signal_ = 0;
};

class connection : public std::enable_shared_from_this<connection> {
public:
  connection(server& owner, tcp::socket socket)
      : server_(owner), socket_(std::move(socket)), idle_timer_(socket_.get_executor()),
        reader_wakeup_(socket_.get_executor()), writer_wakeup_(socket_.get_executor()),
        idle_deadline_(clock_type::now() + owner.idle_timeout()) {}

  void start() {
    asio::error_code ignored;
    socket_.set_option(tcp::no_delay(true), ignored); // answers go out as soon as they are written
    asio::co_spawn(socket_.get_executor(), read_loop(shared_from_this()), asio::detached);
    asio::co_spawn(socket_.get_executor(), write_loop(shared_from_this()), asio::detached);
    asio::co_spawn(socket_.get_executor(), watchdog(shared_from_this()), asio::detached);
  }

  /// Shutdown: read no more requests; the writer answers those already read, then closes.
  void stop_reading() {
    reading_ = false;
    stop_read_.emit(asio::cancellation_type::terminal); // ends the reader's wait for a line
    reader_wakeup_.notify();
  }

  /// The client is gone (or the drain timed out): drop the unwritten answers, end their lookups, close.
  void abort() {
    if (!open_) return;
    open_ = false;
    reading_ = false;
    std::deque<std::shared_ptr<reply>> dropped;
    dropped.swap(replies_);
    server_.count().answers_dropped += dropped.size();
    for (const auto& r : dropped)
      if (!r->ready) server_.abandon(*r);
    asio::error_code ignored;
    socket_.close(ignored);
    reader_wakeup_.notify();
    writer_wakeup_.notify();
  }

  /// A lookup's answer, on the I/O thread. Dropped if the client has gone.
  void answer(reply& r, std::string text) {
    if (!open_) return; // counted in answers_dropped when the connection was aborted
    r.text = std::move(text);
    r.ready = true;
    writer_wakeup_.notify();
  }

private:
  void queue_answer(std::string text) {
    auto r = std::make_shared<reply>();
    replies_.push_back(r);
    answer(*r, std::move(text));
  }

  void handle(std::string_view line) {
    ++server_.count().requests;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line == "GET" || line.starts_with("GET ")) {
      const std::string_view key = line.substr(std::min<std::size_t>(line.size(), 4));
      if (!valid_key(key)) return error("ERR malformed key");
      auto r = std::make_shared<reply>();
      replies_.push_back(r);
      server_.start_lookup(shared_from_this(), r, std::string(key));
    } else if (line == "STATS") {
      queue_answer(server_.stats_line());
    } else {
      error("ERR unknown command");
    }
  }

  void error(std::string text) {
    ++server_.count().errors_sent;
    queue_answer(std::move(text));
  }

  awaitable<void> read_loop(std::shared_ptr<connection> self) {
    std::string buffer;    // holds at most one line (max_line + its LF)
    bool skipping = false; // inside a line over max_line: drop input up to its LF
    while (reading_) {
      if (replies_.size() >= max_in_flight) { // the client is ahead of its answers: stop reading it
        co_await reader_wakeup_.wait();
        continue;
      }
      idle_deadline_ = clock_type::now() + server_.idle_timeout(); // for the watchdog
      waiting_for_line_ = true;
      const auto [failure, length] =
          co_await asio::async_read_until(socket_, asio::dynamic_buffer(buffer, max_line + 1), '\n',
                                          asio::bind_cancellation_slot(stop_read_.slot(), use_nothrow));
      waiting_for_line_ = false;
      if (failure && !reading_) break;         // cancelled by stop_reading: shutdown, or the watchdog
      if (failure == asio::error::not_found) { // max_line + 1 bytes without an LF
        buffer.clear();
        if (!skipping) error("ERR line too long");
        skipping = true;
        continue;
      }
      if (failure == asio::error::eof) break; // the client sent everything: answer it, then close
      if (failure) {                          // reset
        self->abort();
        break;
      }
      const std::string line = buffer.substr(0, length - 1);
      buffer.erase(0, length);
      if (skipping) {
        skipping = false; // that was the end of the long line
        continue;
      }
      handle(line);
    }
    reading_ = false;
    reader_done_ = true;
    idle_timer_.cancel(); // the watchdog's job is done
    writer_wakeup_.notify();
  }

  /// Closes the reading side of a connection whose reader has waited for a line since idle_deadline_.
  /// One timer per connection that wakes about once per timeout, instead of one per read.
  awaitable<void> watchdog(std::shared_ptr<connection> self) {
    while (!reader_done_) {
      idle_timer_.expires_at(idle_deadline_);
      co_await idle_timer_.async_wait(use_nothrow);
      if (reader_done_ || !reading_) break;
      if (waiting_for_line_ && clock_type::now() >= idle_deadline_) {
        ++server_.count().idle_closed;
        self->error("ERR idle timeout");
        self->stop_reading();
        break;
      }
      if (!waiting_for_line_) idle_deadline_ = clock_type::now() + server_.idle_timeout(); // not our wait
    }
  }

  awaitable<void> write_loop(std::shared_ptr<connection> self) {
    std::string out;
    while (open_) {
      out.clear();
      std::size_t lines = 0;
      while (!replies_.empty() && replies_.front()->ready) { // every answer that is ready, in order
        out += replies_.front()->text;
        out += '\n';
        replies_.pop_front();
        ++lines;
      }
      if (lines != 0) {
        reader_wakeup_.notify(); // room in the window
        const auto [failure, written] = co_await asio::async_write(socket_, asio::buffer(out), use_nothrow);
        if (failure) {
          if (open_) server_.count().answers_dropped += lines;
          self->abort();
        }
        continue;
      }
      if (reader_done_ && replies_.empty()) break; // everything read has been answered
      co_await writer_wakeup_.wait();
    }
    if (open_) co_await close_gracefully();
    server_.forget(this);
  }

  /// Sends our FIN after the last answer, then reads and drops whatever the client still sends until it
  /// closes too (or linger_timeout passes): closing a socket with unread input would reset the
  /// connection and could destroy answers still on their way.
  awaitable<void> close_gracefully() {
    asio::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_send, ignored);
    asio::steady_timer linger(socket_.get_executor(), linger_timeout);
    co_await (discard_input() || linger.async_wait(use_nothrow));
    open_ = false;
    socket_.close(ignored);
  }

  awaitable<void> discard_input() {
    char sink[4096];
    for (;;) {
      const auto [failure, n] = co_await socket_.async_read_some(asio::buffer(sink), use_nothrow);
      if (failure) co_return;
    }
  }

  server& server_;
  tcp::socket socket_;
  asio::steady_timer idle_timer_; // the watchdog's
  wakeup reader_wakeup_, writer_wakeup_;
  asio::cancellation_signal stop_read_;        // cancels the reader's read
  std::deque<std::shared_ptr<reply>> replies_; // in request order
  clock_type::time_point idle_deadline_;       // the reader waits for a line until then
  bool waiting_for_line_ = false;              // the reader is in its read
  bool reading_ = true;                        // the reader should go on reading
  bool reader_done_ = false;                   // the reader has finished
  bool open_ = true;                           // the socket is usable (not aborted, not closed)
};

void server::start_lookup(const std::shared_ptr<connection>& c, const std::shared_ptr<reply>& r, std::string key) {
  ++count_.lookups_started;
  if (batcher_) {
    Lookup job{std::move(key)}; // named: see the README on g++ and temporaries in co_await expressions
    microbatch::async_execute(
        *batcher_, std::move(job),
        asio::bind_cancellation_slot(r->cancel.slot(),
                                     asio::bind_executor(io_, [this, c, r](std::exception_ptr error, Row row) {
                                       ++count_.lookups_ended;
                                       if (!error) return c->answer(*r, std::move(row.value));
                                       try {
                                         std::rethrow_exception(error);
                                       } catch (const microbatch::no_result&) {
                                         c->answer(*r, "NOT_FOUND"); // the table had no row for the key
                                       } catch (const microbatch::cancelled&) {
                                         // the client went away while its job was queued: nobody to answer
                                       } catch (const std::exception& e) {
                                         ++count_.errors_sent;
                                         c->answer(*r, "ERR internal");
                                         std::fprintf(stderr, "lookup failed: %s\n", e.what());
                                       }
                                     })));
  } else {
    // The same table call for one key on one of the pool's threads; the work guard keeps io.run()
    // going until the answer is back on the I/O thread.
    asio::post(*pool_, [this, c, r, job = Lookup{std::move(key)}, work = asio::make_work_guard(io_)] {
      std::optional<std::string> text;
      if (!r->abandoned) {
        const std::vector<Row> rows = db_.lookup(std::span(&job, 1));
        text = rows.empty() ? "NOT_FOUND" : rows.front().value;
      }
      asio::post(io_, [this, c, r, text = std::move(text)]() mutable {
        ++count_.lookups_ended;
        if (text) c->answer(*r, std::move(*text));
      });
    });
  }
}

awaitable<void> server::accept_loop() {
  while (!stopping_) {
    auto [error, socket] = co_await acceptor_.async_accept(use_nothrow);
    if (stopping_) break;
    if (error) { // e.g. out of file descriptors: pause instead of spinning
      std::fprintf(stderr, "accept: %s\n", error.message().c_str());
      asio::steady_timer pause(io_, 50ms);
      co_await pause.async_wait(use_nothrow);
      continue;
    }
    if (connections_.size() >= cfg_.max_connections) {
      ++count_.refused;
      static constexpr std::string_view refusal = "ERR too many connections\n";
      asio::error_code ignored;
      socket.write_some(asio::buffer(refusal), ignored); // a new socket's send buffer has room for it
      socket.close(ignored);
      continue;
    }
    ++count_.accepted;
    auto c = std::make_shared<connection>(*this, std::move(socket));
    connections_.insert(c.get());
    c->start();
  }
}

// The metrics endpoint: the smallest HTTP/1.1 server a Prometheus scrape needs. One request per
// connection (the answer says Connection: close), GET /metrics only, the request head bounded to 8 KiB
// and 5 s; the batcher's counters are read per request, so nothing is done per job.
awaitable<void> server::metrics_loop() {
  while (!stopping_) {
    auto [error, socket] = co_await metrics_acceptor_->async_accept(use_nothrow);
    if (stopping_) break;
    if (error) continue; // a failed accept on the metrics port costs the lookups nothing
    auto shared = std::make_shared<tcp::socket>(std::move(socket));
    metrics_sockets_.insert(shared);
    asio::co_spawn(io_, serve_metrics(shared), asio::detached);
  }
}

awaitable<void> server::serve_metrics(std::shared_ptr<tcp::socket> socket) {
  std::string head;
  asio::steady_timer deadline(io_, 5s);
  const auto read =
      co_await (asio::async_read_until(*socket, asio::dynamic_buffer(head, 8192), "\r\n\r\n", use_nothrow) ||
                deadline.async_wait(use_nothrow));
  if (read.index() == 0 && !std::get<0>(std::get<0>(read))) { // the head arrived in time
    const bool wanted = head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?");
    const std::string body = wanted ? microbatch::to_prometheus(batcher_->stats(), "lookups") : "not found\n";
    const std::string response = std::string(wanted ? "HTTP/1.1 200 OK\r\n" : "HTTP/1.1 404 Not Found\r\n") +
                                 "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                                 "Content-Length: " +
                                 std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
    co_await asio::async_write(*socket, asio::buffer(response), use_nothrow);
  }
  asio::error_code ignored;
  socket->shutdown(tcp::socket::shutdown_both, ignored);
  socket->close(ignored);
  metrics_sockets_.erase(socket);
}

void server::stop(int signal_number) {
  stopping_ = true;
  stop_signal_ = signal_number;
  asio::error_code ignored;
  acceptor_.close(ignored);
  if (metrics_acceptor_) metrics_acceptor_->close(ignored);
  for (const auto& socket : metrics_sockets_)
    socket->close(ignored); // a scrape in progress ends here; its coroutine finishes on its own
  for (connection* c : connections_)
    c->stop_reading();
  drain_timer_.expires_after(drain_timeout);
  drain_timer_.async_wait([this](asio::error_code error) {
    if (error) return; // every connection finished in time
    const std::vector<connection*> late(connections_.begin(), connections_.end());
    for (connection* c : late)
      c->abort();
  });
  if (connections_.empty()) drain_timer_.cancel();
}

void server::forget(connection* c) {
  connections_.erase(c);
  if (stopping_ && connections_.empty()) drain_timer_.cancel();
}

// ------------------------------------------------------------------------------------------------
// Command line

struct arguments {
  std::map<std::string, std::string> named;
  std::string get(const std::string& name, const std::string& fallback) const {
    auto it = named.find(name);
    return it == named.end() ? fallback : it->second;
  }
  long number(const std::string& name, long fallback) const {
    auto it = named.find(name);
    if (it == named.end()) return fallback;
    char* end = nullptr;
    const long value = std::strtol(it->second.c_str(), &end, 10);
    if (end == it->second.c_str() || *end != '\0' || value < 0) {
      std::fprintf(stderr, "--%s wants a number, not '%s'\n", name.c_str(), it->second.c_str());
      std::exit(2);
    }
    return value;
  }
};

int serve(const arguments& args) {
  server::config cfg;
  cfg.port = static_cast<unsigned short>(args.number("port", 0));
  const std::string mode = args.get("mode", "batched");
  if (mode != "batched" && mode != "direct") {
    std::fprintf(stderr, "--mode is batched or direct\n");
    return 2;
  }
  cfg.batched = mode == "batched";
  cfg.idle_timeout = std::chrono::milliseconds(args.number("idle-timeout-ms", 30000));
  cfg.db_connections = std::size_t(std::max(1L, args.number("db-connections", 4)));
  cfg.max_connections = std::size_t(std::max(1L, args.number("max-connections", 1024)));
  if (args.named.contains("metrics-port")) {
    if (!cfg.batched) {
      std::fprintf(stderr, "--metrics-port serves the batcher's figures: batched mode only\n");
      return 2;
    }
    cfg.metrics_port = static_cast<unsigned short>(args.number("metrics-port", 0));
  }

  asio::io_context io(1);
  server s(io, cfg);
  s.start();
  std::printf("port %u\n", unsigned(s.port()));
  if (const auto metrics = s.metrics_port()) std::printf("metrics_port %u\n", unsigned(*metrics));
  std::fflush(stdout);
  io.run();
  s.finish();
  return 0;
}

// ------------------------------------------------------------------------------------------------
// Load generator

struct client_result {
  std::vector<std::uint32_t> latencies_ns;
  std::uint64_t wrong = 0;
  std::string failure;
};

/// The key the i-th request of a client asks for, and the answer it expects: about 1.5% of the keys
/// are not in the table.
std::pair<std::string, std::string> request_for(std::uint64_t i) {
  if (i < table_rows) return {"key" + std::to_string(i), "value" + std::to_string(i)};
  return {"key" + std::to_string(i), "NOT_FOUND"};
}

awaitable<void> client_loop(tcp::socket socket, clock_type::time_point end, client_result& out, std::uint64_t seed,
                            bool present_only) {
  std::mt19937_64 random(seed);
  std::string request, in;
  const std::uint64_t keys = present_only ? table_rows : table_rows + table_rows / 64;
  try {
    while (clock_type::now() < end) {
      auto [key, expected] = request_for(random() % keys);
      request = "GET " + key + "\n";
      const auto start = clock_type::now();
      co_await asio::async_write(socket, asio::buffer(request), asio::use_awaitable);
      const std::size_t n =
          co_await asio::async_read_until(socket, asio::dynamic_buffer(in), '\n', asio::use_awaitable);
      out.latencies_ns.push_back(std::uint32_t(std::min<std::int64_t>((clock_type::now() - start) / 1ns, UINT32_MAX)));
      if (std::string_view(in).substr(0, n - 1) != expected) {
        if (out.wrong++ == 0)
          std::fprintf(stderr, "GET %s: expected %s, got %s\n", key.c_str(), expected.c_str(),
                       in.substr(0, n - 1).c_str());
      }
      in.erase(0, n);
    }
  } catch (const std::exception& e) {
    out.failure = e.what();
  }
}

double percentile_us(std::vector<std::uint32_t>& v, double p) {
  if (v.empty()) return 0;
  const auto at = v.begin() + std::ptrdiff_t(std::min(v.size() - 1, std::size_t(p * double(v.size() - 1) + 0.5)));
  std::nth_element(v.begin(), at, v.end());
  return double(*at) / 1000.0;
}

std::map<std::string, std::uint64_t> server_stats(asio::io_context& io, unsigned short port);

int load(const arguments& args) {
  const auto port = static_cast<unsigned short>(args.number("port", 0));
  const std::size_t connections = std::size_t(std::max(1L, args.number("connections", 1)));
  const auto duration = std::chrono::milliseconds(long(1000 * std::strtod(args.get("seconds", "3").c_str(), nullptr)));
  const tcp::endpoint server_at(asio::ip::address_v4::loopback(), port);
  const std::string keys = args.get("keys", "mixed");
  if (keys != "mixed" && keys != "present") {
    std::fprintf(stderr, "--keys is mixed or present\n");
    return 2;
  }

  asio::io_context io(1);
  const std::uint64_t calls_before = server_stats(io, port)["table_calls"];
  std::vector<client_result> results(connections);
  clock_type::time_point start;
  asio::co_spawn(
      io,
      [&]() -> awaitable<void> {
        std::vector<tcp::socket> sockets; // every connection is open before the clock starts
        for (std::size_t i = 0; i < connections; ++i) {
          sockets.emplace_back(io);
          co_await sockets.back().async_connect(server_at, asio::use_awaitable);
          sockets.back().set_option(tcp::no_delay(true));
        }
        start = clock_type::now();
        for (std::size_t i = 0; i < connections; ++i)
          asio::co_spawn(io,
                         client_loop(std::move(sockets[i]), start + duration, results[i],
                                     0x9e3779b97f4a7c15ull * (i + 1), keys == "present"),
                         asio::detached);
      },
      [](std::exception_ptr error) {
        if (error) std::rethrow_exception(error);
      });
  io.run();
  const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();

  std::vector<std::uint32_t> all;
  std::uint64_t wrong = 0;
  for (client_result& r : results) {
    all.insert(all.end(), r.latencies_ns.begin(), r.latencies_ns.end());
    wrong += r.wrong;
    if (!r.failure.empty()) {
      std::fprintf(stderr, "a connection failed: %s\n", r.failure.c_str());
      return 1;
    }
  }
  const std::size_t requests = all.size();
  const double calls = double(server_stats(io, port)["table_calls"] - calls_before);
  std::printf("connections=%zu requests=%zu seconds=%.2f requests_per_s=%.0f p50_us=%.0f p99_us=%.0f "
              "table_calls_per_request=%.3f wrong=%llu\n",
              connections, requests, seconds, double(requests) / seconds, percentile_us(all, 0.50),
              percentile_us(all, 0.99), calls / double(std::max<std::size_t>(requests, 1)),
              static_cast<unsigned long long>(wrong));
  return wrong == 0 ? 0 : 1;
}

// ------------------------------------------------------------------------------------------------
// Checks against the live server

int failures = 0;
void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  std::fflush(stdout);
  if (!ok) ++failures;
}

/// A blocking line client (the run script bounds the whole check with `timeout`).
class line_client {
public:
  line_client(asio::io_context& io, unsigned short port) : socket_(io) {
    socket_.connect(tcp::endpoint(asio::ip::address_v4::loopback(), port));
    socket_.set_option(tcp::no_delay(true));
  }
  void send(std::string_view text) { asio::write(socket_, asio::buffer(text)); }
  /// The next line without its LF; nullopt once the server closed the connection.
  std::optional<std::string> line() {
    asio::error_code error;
    const std::size_t n = asio::read_until(socket_, asio::dynamic_buffer(in_), '\n', error);
    if (error) return std::nullopt;
    std::string text = in_.substr(0, n - 1);
    in_.erase(0, n);
    return text;
  }
  std::string ask(std::string_view request) {
    send(std::string(request) + "\n");
    return line().value_or("<closed>");
  }
  /// Closes with a reset (SO_LINGER 0), as a crashed or killed client would.
  void reset() {
    socket_.set_option(asio::socket_base::linger(true, 0));
    socket_.close();
  }
  tcp::socket& socket() { return socket_; }

private:
  tcp::socket socket_;
  std::string in_;
};

std::map<std::string, std::uint64_t> server_stats(asio::io_context& io, unsigned short port) {
  line_client c(io, port);
  std::map<std::string, std::uint64_t> stats;
  std::string text = c.ask("STATS");
  for (std::size_t at = text.find(' '); at != std::string::npos; at = text.find(' ', at + 1)) {
    const std::size_t eq = text.find('=', at);
    if (eq == std::string::npos) break;
    stats[text.substr(at + 1, eq - at - 1)] = std::strtoull(text.c_str() + eq + 1, nullptr, 10);
  }
  return stats;
}

double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

int check(const arguments& args) {
  const auto port = static_cast<unsigned short>(args.number("port", 0));
  const auto idle = std::chrono::milliseconds(args.number("idle-timeout-ms", 1000));
  asio::io_context io;

  { // answers
    line_client c(io, port);
    expect(c.ask("GET key42") == "value42", "GET key42 answers value42");
    expect(c.ask("GET key99999") == "value99999", "GET key99999 answers value99999");
    expect(c.ask("GET key100000") == "NOT_FOUND", "GET of a key not in the table answers NOT_FOUND");
    expect(c.ask("GET key7\r") == "value7", "a CR before the LF is accepted");
    std::string burst;
    for (std::uint64_t i = 0; i < 200; ++i)
      burst += "GET " + request_for(i * 7919 % (table_rows + 500)).first + "\n";
    c.send(burst);
    bool in_order = true;
    for (std::uint64_t i = 0; i < 200; ++i)
      in_order &= c.line() == request_for(i * 7919 % (table_rows + 500)).second;
    expect(in_order, "200 pipelined GETs in one write: 200 right answers, in request order");
  }
  { // bad input: one ERR line each, and the connection stays usable
    line_client c(io, port);
    bool all = true;
    for (const char* bad : {"PUT key1 x", "get key1", "", "GETkey1", "STATS now", "\x01\x02"})
      all &= c.ask(bad) == "ERR unknown command";
    expect(all, "unknown commands (PUT, lower case, empty line, binary) answer ERR unknown command");
    expect(c.ask("GET key1") == "value1", "... and the connection still answers GETs");
    all = true;
    for (const std::string& bad : std::vector<std::string>{"GET", "GET ", "GET a b", "GET ke$y", "GET key1 ",
                                                           "GET k\x7f", "GET " + std::string(max_key + 1, 'k')})
      all &= c.ask(bad) == "ERR malformed key";
    expect(all, "malformed keys (none, empty, spaces, $, DEL, 65 characters) answer ERR malformed key");
    expect(c.ask("GET " + std::string(max_key, 'k')) == "NOT_FOUND", "a 64-character key is well-formed");
    expect(c.ask("GET " + std::string(max_line - 4, 'k')) == "ERR malformed key",
           "a 1024-byte line is within the limit (its key is what is wrong)");
    expect(c.ask("GET " + std::string(max_line - 3, 'k')) == "ERR line too long",
           "a 1025-byte line: ERR line too long");
    expect(c.ask(std::string(1 << 20, 'x')) == "ERR line too long" && c.ask("GET key5") == "value5",
           "a 1 MiB line: one ERR line too long, and the next GET on the connection is answered");
    c.send("GET key1\n" + std::string(3000, 'x') + "\nGET key2\nBAD\n");
    const bool mixed = c.line() == "value1" && c.line() == "ERR line too long" && c.line() == "value2" &&
                       c.line() == "ERR unknown command";
    expect(mixed, "pipelined GET, long line, GET, bad command: answers in order, each once");
  }
  { // idle timeout (three connections at once)
    double silent_closed = 0, partial_closed = 0;
    std::optional<std::string> silent_said;
    bool active_ok = true;
    std::thread silent([&] {
      line_client c(io, port);
      const auto start = clock_type::now();
      silent_said = c.line();
      const bool closed = !c.line();
      silent_closed = closed ? seconds_since(start) : -1;
    });
    std::thread partial([&] {
      line_client c(io, port);
      const auto start = clock_type::now();
      c.send("GET key1"); // never finished
      const bool closed = c.line() == "ERR idle timeout" && !c.line();
      partial_closed = closed ? seconds_since(start) : -1;
    });
    std::thread active([&] {
      line_client c(io, port);
      for (int i = 0; i < 8; ++i) {
        std::this_thread::sleep_for(idle / 3);
        active_ok &= c.ask("GET key" + std::to_string(i)) == "value" + std::to_string(i);
      }
    });
    silent.join();
    partial.join();
    active.join();
    const double t = std::chrono::duration<double>(idle).count();
    expect(silent_said == "ERR idle timeout" && silent_closed >= 0.9 * t && silent_closed < t + 1.5,
           "a silent connection gets ERR idle timeout and is closed after " + std::to_string(silent_closed) +
               " s (timeout " + std::to_string(t) + " s)");
    expect(partial_closed >= 0.9 * t && partial_closed < t + 1.5,
           "a connection that never finishes its line is closed after the timeout too");
    expect(active_ok, "a connection that sends a request every timeout/3 stays open for 8 requests (2.7x the timeout)");
  }
  { // clients that vanish with requests in flight, while another client works
    std::atomic<bool> done{false};
    std::uint64_t other_answers = 0, other_wrong = 0;
    double other_max_ms = 0;
    std::thread other([&] {
      line_client c(io, port);
      std::mt19937_64 random(7);
      while (!done) {
        auto [key, expected] = request_for(random() % (table_rows + 1000));
        const auto start = clock_type::now();
        other_wrong += c.ask("GET " + key) != expected;
        other_max_ms = std::max(other_max_ms, seconds_since(start) * 1000);
        ++other_answers;
      }
    });
    auto before = server_stats(io, port);
    int vanished = 0;
    for (int round = 0; round < 20; ++round) {
      line_client gone(io, port);
      std::string burst;
      for (int i = 0; i < 100; ++i)
        burst += "GET key" + std::to_string(round * 100 + i) + "\n";
      gone.send(burst);
      vanished += gone.line() == "value" + std::to_string(round * 100); // its requests are being served
      gone.reset();
    }
    std::this_thread::sleep_for(300ms);
    done = true;
    other.join();
    expect(vanished == 20, "20 clients each sent 100 GETs, read one answer and reset the connection");
    expect(other_answers > 0 && other_wrong == 0, "meanwhile another client got " + std::to_string(other_answers) +
                                                      " answers, all right (slowest " +
                                                      std::to_string(int(other_max_ms)) + " ms)");
    std::map<std::string, std::uint64_t> after;
    for (int attempt = 0; attempt < 50; ++attempt) { // their last jobs may still be ending
      after = server_stats(io, port);
      if (after["lookups_started"] == after["lookups_ended"] && after["connections"] == 1) break;
      std::this_thread::sleep_for(20ms);
    }
    expect(after["lookups_started"] == after["lookups_ended"] && after["connections"] == 1,
           "every lookup of theirs ended (started " + std::to_string(after["lookups_started"]) + " = ended " +
               std::to_string(after["lookups_ended"]) + ") and no connection is left behind");
    const std::uint64_t dropped = after["answers_dropped"] - before["answers_dropped"];
    expect(dropped > 0, std::to_string(dropped) + " of their answers were dropped" +
                            (after.contains("jobs_cancelled")
                                 ? " (" + std::to_string(after["jobs_cancelled"] - before["jobs_cancelled"]) +
                                       " jobs cancelled while queued)"
                                 : std::string()));
    if (after.contains("pending_jobs")) expect(after["pending_jobs"] == 0, "the batcher holds no pending job");
    line_client c(io, port);
    expect(c.ask("GET key3") == "value3", "the server still answers");
  }
  if (const long max_connections = args.number("max-connections", 0); max_connections > 0) {
    for (int attempt = 0; attempt < 100 && server_stats(io, port)["connections"] > 1; ++attempt)
      std::this_thread::sleep_for(20ms); // the clients above have closed; the server may not have noticed yet
    std::vector<std::unique_ptr<line_client>> held; // up to the server's limit, each one served
    bool served = true;
    for (long i = 0; i < max_connections; ++i) {
      held.push_back(std::make_unique<line_client>(io, port));
      served &= held.back()->ask("STATS").starts_with("STATS ");
    }
    line_client extra(io, port);
    expect(served && extra.line() == "ERR too many connections" && !extra.line(),
           std::to_string(max_connections) +
               " connections are served, the next one gets ERR too many connections and is closed");
    expect(held.back()->ask("GET key2") == "value2", "... while the others are still served");
    held.clear();
    bool again = false;
    for (int attempt = 0; attempt < 100 && !again; ++attempt) { // once the server has noticed the closes
      line_client c(io, port);
      again = c.ask("GET key3") == "value3";
      if (!again) std::this_thread::sleep_for(20ms);
    }
    expect(again, "once they closed, new connections are served again");
  }
  { // a client that sends everything, then half-closes, still gets every answer
    line_client c(io, port);
    std::string burst;
    for (int i = 0; i < 50; ++i)
      burst += "GET key" + std::to_string(i) + "\n";
    c.send(burst);
    c.socket().shutdown(tcp::socket::shutdown_send);
    int right = 0;
    for (int i = 0; i < 50; ++i)
      right += c.line() == "value" + std::to_string(i);
    expect(right == 50 && !c.line(), "a client that sends 50 GETs and half-closes gets 50 answers, then EOF");
  }
  std::printf("%s\n", failures == 0 ? "all checks passed" : "CHECKS FAILED");
  return failures == 0 ? 0 : 1;
}

/// Signals the server while requests are in flight: every answer that arrives must be right and in
/// order, and the connection must then close (the server answered what it had read, then stopped).
int stop(const arguments& args) {
  const auto port = static_cast<unsigned short>(args.number("port", 0));
  const pid_t pid = pid_t(args.number("pid", 0));
  const std::string signal_name = args.get("signal", "TERM");
  const int signal_number = signal_name == "INT" ? SIGINT : SIGTERM;
  asio::io_context io;
  std::vector<std::unique_ptr<line_client>> clients;
  for (int i = 0; i < 4; ++i) {
    clients.push_back(std::make_unique<line_client>(io, port));
    std::string burst;
    for (int k = 0; k < 100; ++k)
      burst += "GET key" + std::to_string(i * 1000 + k) + "\n";
    clients.back()->send(burst);
  }
  std::vector<std::size_t> answered(clients.size(), 0);
  bool right = true;
  for (std::size_t i = 0; i < clients.size(); ++i) { // the first answer of each: they are being served
    right &= clients[i]->line() == "value" + std::to_string(i * 1000);
    answered[i] = 1;
  }
  const auto start = clock_type::now();
  expect(::kill(pid, signal_number) == 0, "sent SIG" + signal_name + " with 4 connections x 100 GETs in flight");
  for (std::size_t i = 0; i < clients.size(); ++i) {
    while (const std::optional<std::string> got = clients[i]->line()) { // until the server closes it
      right &= *got == "value" + std::to_string(i * 1000 + answered[i]);
      ++answered[i];
    }
  }
  std::string counts;
  for (std::size_t a : answered)
    counts += (counts.empty() ? "" : ", ") + std::to_string(a);
  expect(right, "each connection got right answers in order (" + counts + " of 100), then was closed after " +
                    std::to_string(int(seconds_since(start) * 1000)) + " ms");
  bool refused = false;
  try {
    line_client late(io, port);
  } catch (const std::exception&) {
    refused = true;
  }
  expect(refused, "new connections are refused");
  return failures == 0 ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
  const char* usage = "usage: %s serve [--port P] [--mode batched|direct] [--idle-timeout-ms T] [--db-connections C]\n"
                      "                     [--max-connections M] [--metrics-port Q]\n"
                      "       %s load --port P --connections N --seconds S [--keys mixed|present]\n"
                      "       %s check --port P --idle-timeout-ms T\n"
                      "       %s stop --port P --pid PID --signal TERM|INT\n";
  arguments args;
  for (int i = 2; i + 1 < argc; i += 2) {
    if (std::strncmp(argv[i], "--", 2) != 0) {
      std::fprintf(stderr, usage, argv[0], argv[0], argv[0], argv[0]);
      return 2;
    }
    args.named[argv[i] + 2] = argv[i + 1];
  }
  const std::string command = argc >= 2 && argc % 2 == 0 ? argv[1] : "";
  if (command == "serve") return serve(args);
  if (command == "load") return load(args);
  if (command == "check") return check(args);
  if (command == "stop") return stop(args);
  std::fprintf(stderr, usage, argv[0], argv[0], argv[0], argv[0]);
  return 2;
}
